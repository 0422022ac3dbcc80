'''Docstring: predict the next argument name in a docstring's ``:param`` list.

Heimersheim and Janiak's docstring circuit is a compact, well-documented circuit that
copies the right name out of a function signature; the paper studies it on OLMo-7B.
The toy version trains the same behaviour into a small model on the shared vocabulary.

Format (toy vocabulary, 20 tokens; ``F`` from ``DOC_FUNCS``, ``A B C`` three distinct
``DOC_ARGS``, each ``D`` a ``DOC_DESC`` word drawn per slot)::

    <bos> def F ( A , B , C ) : """ D :param A D :param B D :param   → C

The distractors are the two argument names already documented (A and B); the metric is
the correct logit minus the best distractor. The corrupted prompt replaces A, B, C by
three other distinct argument names, in the signature and the docstring alike.
'''

from __future__ import annotations

import torch

from circuitkit.tasks.base import Draw, SingleAnswerTask, register_task
from circuitkit.tasks.sampling import sample_distinct, sample_from
from circuitkit.tasks.vocab import DOC_ARGS, DOC_DESC, DOC_FUNCS, VOCAB

TEMPLATE = ["<bos>", "def", "[F]", "(", "[A]", ",", "[B]", ",", "[C]", ")", ":", '"""',
            "[D]", ":param", "[A]", "[D]", ":param", "[B]", "[D]", ":param"]
SEQ_LEN = len(TEMPLATE)  # 20
ANSWER_POS = SEQ_LEN - 1  # 19
ARG_SLOTS = ("[A]", "[B]", "[C]")
ARG_POSITIONS = tuple(i for i, w in enumerate(TEMPLATE) if w in ARG_SLOTS)  # 4, 6, 8, 14, 17

ARG_IDS = torch.tensor(VOCAB.ids(DOC_ARGS))  # [n_args]
FUNC_IDS = torch.tensor(VOCAB.ids(DOC_FUNCS))
DESC_IDS = torch.tensor(VOCAB.ids(DOC_DESC))
N_DESC = TEMPLATE.count("[D]")  # 3
# position roles: the arguments in the signature (A, B, C) and in the docstring (docA, docB), the final token
POSITION_LABELS = tuple({4: "A", 6: "B", 8: "C", 14: "docA", 17: "docB", ANSWER_POS: "end"}.get(i, str(i))
                        for i in range(SEQ_LEN))


def encode(func: torch.Tensor, args: torch.Tensor, desc: torch.Tensor) -> torch.Tensor:
    """[n], [n, 3], [n, 3] token ids -> prompts [n, 20]."""
    cols, d = [], 0
    for w in TEMPLATE:
        if w in ARG_SLOTS:
            cols.append(args[:, ARG_SLOTS.index(w)])
        elif w == "[F]":
            cols.append(func)
        elif w == "[D]":
            cols.append(desc[:, d])
            d += 1
        else:
            cols.append(torch.full_like(func, VOCAB.id(w)))
    return torch.stack(cols, dim=1)


@register_task("docstring")
class Docstring(SingleAnswerTask):
    name = "docstring"
    answer_pos = ANSWER_POS
    position_labels = POSITION_LABELS

    def draw(self, n: int, g: torch.Generator) -> Draw:
        arg_idx = sample_distinct(n, 3, len(ARG_IDS), g)  # [n, 3]
        func = sample_from(FUNC_IDS, n, g)
        desc = DESC_IDS[torch.randint(len(DESC_IDS), (n, N_DESC), generator=g)]  # [n, 3]
        args = ARG_IDS[arg_idx]
        fresh = ARG_IDS[sample_distinct(n, 3, len(ARG_IDS), g, exclude=arg_idx)]  # [n, 3], none of A, B, C
        return Draw(clean=encode(func, args, desc), corrupt=encode(func, fresh, desc), answer=args[:, 2],
                    distractor=args[:, :2], labels={"args": args})
