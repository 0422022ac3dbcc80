"""Indirect object identification: "When A and B went to the store, B gave a book to" → A.

IOI is the classic large circuit found in GPT-2 small (name movers, S-inhibition,
duplicate-token and induction heads). It is one of the paper's two GPT-2 tasks, so the
toy version lets the same circuit pipeline run on a model trained here in minutes.

Format (toy vocabulary, 15 tokens)::

    <bos> When N1 and N2 went to the PLACE , S gave a OBJ to   → IO

Two orders: ABBA (``N1`` is the indirect object IO, ``S = N2``) and BABA (``N1`` is the
subject, ``S = N1``); ``labels["order"]`` is 0 for ABBA and 1 for BABA. The distractor is
the subject S. The corrupted prompt is the "ABC" prompt: the three name slots get three
fresh distinct names, none of them IO or S, with place and object unchanged.
"""

from __future__ import annotations

import torch

from circuitkit import CircuitkitError
from circuitkit.tasks.base import Draw, SingleAnswerTask, register_task
from circuitkit.tasks.sampling import sample_distinct, sample_from
from circuitkit.tasks.vocab import IOI_OBJECTS, IOI_PLACES, NAMES, VOCAB

TEMPLATE = ["<bos>", "When", "[N1]", "and", "[N2]", "went", "to", "the", "[PLACE]", ",", "[S]",
            "gave", "a", "[OBJ]", "to"]
SEQ_LEN = len(TEMPLATE)  # 15
ANSWER_POS = SEQ_LEN - 1  # 14
N1_POS, N2_POS, S_POS = TEMPLATE.index("[N1]"), TEMPLATE.index("[N2]"), TEMPLATE.index("[S]")  # 2, 4, 10
PLACE_POS, OBJ_POS = TEMPLATE.index("[PLACE]"), TEMPLATE.index("[OBJ]")  # 8, 13
NAME_POSITIONS = (N1_POS, N2_POS, S_POS)
ORDERS = ("abba", "baba")
# position roles: the three name slots and the final token (where the answer is read); the rest by index
POSITION_LABELS = tuple({N1_POS: "N1", N2_POS: "N2", S_POS: "S", ANSWER_POS: "end"}.get(i, str(i))
                        for i in range(SEQ_LEN))

NAME_IDS = torch.tensor(VOCAB.ids(NAMES))  # [n_names]
PLACE_IDS = torch.tensor(VOCAB.ids(IOI_PLACES))
OBJ_IDS = torch.tensor(VOCAB.ids(IOI_OBJECTS))


def encode(n1: torch.Tensor, n2: torch.Tensor, s: torch.Tensor, place: torch.Tensor,
           obj: torch.Tensor) -> torch.Tensor:  # [n] token ids each -> [n, 15]
    fixed = {w: VOCAB.id(w) for w in TEMPLATE if not w.startswith("[")}
    slots = {"[N1]": n1, "[N2]": n2, "[S]": s, "[PLACE]": place, "[OBJ]": obj}
    return torch.stack([slots[w] if w in slots else torch.full_like(n1, fixed[w]) for w in TEMPLATE], dim=1)


@register_task("ioi")
class IOI(SingleAnswerTask):
    name = "ioi"
    answer_pos = ANSWER_POS
    position_labels = POSITION_LABELS

    def __init__(self, order: str | None = None) -> None:
        if order is not None and order not in ORDERS:
            raise CircuitkitError(f"order must be one of {ORDERS} or None (both, half each at random), got {order!r}")
        self.order = order

    def draw(self, n: int, g: torch.Generator) -> Draw:
        names = sample_distinct(n, 2, len(NAME_IDS), g)  # [n, 2]: IO, S (indices into NAMES)
        io, s = NAME_IDS[names[:, 0]], NAME_IDS[names[:, 1]]
        if self.order is None:
            order = torch.randint(2, (n,), generator=g)
        else:
            order = torch.full((n,), ORDERS.index(self.order), dtype=torch.long)
        place, obj = sample_from(PLACE_IDS, n, g), sample_from(OBJ_IDS, n, g)
        baba = order.bool()
        n1, n2 = torch.where(baba, s, io), torch.where(baba, io, s)
        clean = encode(n1, n2, s, place, obj)  # [n, 15]
        abc = NAME_IDS[sample_distinct(n, 3, len(NAME_IDS), g, exclude=names)]  # [n, 3]
        corrupt = encode(abc[:, 0], abc[:, 1], abc[:, 2], place, obj)  # [n, 15]
        return Draw(clean=clean, corrupt=corrupt, answer=io, distractor=s, labels={"order": order, "io": io, "s": s})
