'''Natural-language task variants for pretrained models, built with the model's own tokenizer.

The toy tasks live on circuitkit's word-level vocabulary; a pretrained model (GPT-2,
Pythia, ...) needs the same behaviours written as text and tokenized by its own Hugging
Face tokenizer. These are the tasks the paper runs on GPT-2 (IOI, greater-than) and on
OLMo (docstring), plus induction on random tokens:

- ``ioi-nl``: "When Mary and John went to the store, John gave a drink to" → " Mary"
  (several templates, ABBA and BABA); corrupted: the three names resampled (ABC).
- ``greater-than-nl``: "The war lasted from the year 1732 to the year 17" → a year token
  above 32; scored by probability mass over the tokenizer's two-digit year tokens.
  Corrupted: the year written 1701.
- ``docstring-nl``: a Python ``def`` with a docstring listing ``:param`` lines → the next
  argument name; corrupted: argument names resampled everywhere.
- ``induction-nl``: the toy task's layout (filler, a segment of 4–8 tokens, its repeat →
  the next repeated token) over random token ids from the tokenizer's vocabulary.

Every name, year and argument is one token (with its leading space where it follows a
space). The built-in word lists are filtered to the entries the tokenizer keeps whole,
and the task refuses to run when too few remain; a list passed in by the caller must be
all single tokens, and a word that is split is an error naming it and its pieces. Clean
and corrupted prompts of one example always have the same token length. Prompts of
different templates may differ in length: a batch is right-padded with the pad token and
``answer_pos`` points at each prompt's own last token (padding lies after it, so a causal
model's answer logits do not see it). Pass ``template=k`` for one template, hence one
length and aligned positions across the batch.

Construct them with ``tokenizer=model.tokenizer`` (and ``d_vocab=model.cfg.d_vocab`` when
the model's vocabulary is larger than the tokenizer's), or simply with
:func:`circuitkit.tasks.task_for_model`.
'''

from __future__ import annotations

from typing import Any, Sequence

import torch

from circuitkit import CircuitkitError
from circuitkit.tasks import induction as toy_induction
from circuitkit.tasks.base import Metric, Task, TaskDataset, check_n, register_task
from circuitkit.tasks.greater_than import sample_above, year_sets
from circuitkit.tasks.sampling import sample_distinct

IOI_NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Paul", "Mark", "Dan",
             "Emma", "Sam", "Rose", "Michael", "David", "Kevin", "Lisa", "Anna", "Andrew", "Daniel",
             "Laura", "Robert", "Peter", "Kate", "Jessica", "Brian", "Steven", "Maria", "Jack", "Eric"]
IOI_PLACES = ["store", "park", "school", "garden", "hospital", "restaurant", "office", "station",
              "house", "beach", "market", "library"]
IOI_OBJECTS = ["book", "ball", "drink", "ring", "bone", "computer", "snack", "letter", "gift", "key"]
# {N1} and {N2} are the first two name slots, {S} the repeated subject; each name follows a space.
IOI_TEMPLATES = [
    "When {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "After {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "Then, {N1} and {N2} had a long argument. Afterwards {S} said to",
]

GT_NOUNS = ["war", "siege", "expedition", "reign", "drought", "voyage", "project", "dynasty",
            "revolution", "occupation", "journey", "strike"]
GT_TEMPLATE = "The {NOUN} lasted from the year 17{YY} to the year 17"
GT_CENTURY = "17"
GT_CORRUPT_YY = 1

DOC_FUNCS = ["load", "save", "fit", "plot", "run", "update", "parse", "check", "build", "read"]
DOC_ARGS = ["x", "y", "size", "name", "path", "data", "mode", "key", "value", "index", "count",
            "shape", "axis", "seed", "step", "text", "file", "line", "user", "item", "model",
            "state", "source", "target", "order", "color", "type", "length", "width", "height"]
# summaries and description words avoid every DOC_ARGS word, so argument names occur only as arguments
DOC_SUMMARIES = ["Load the records.", "Run the job.", "Update the cache.", "Check the input.",
                 "Build the object.", "Read the config.", "Clear the log.", "Parse the entry."]
DOC_WORDS = ["input", "number", "records", "config", "cache", "result", "maximum", "retries", "current",
             "job", "object", "entry", "old", "new", "whether", "log", "first", "last", "default", "optional"]
DOC_TEMPLATE = ('def {F}(self, {A}, {B}, {C}):\n    """{SUMMARY}\n\n    :param {A}: {D1} {D2}\n'
                "    :param {B}: {D3} {D4}\n    :param")
N_DOC_WORDS = 4

def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


class TokenizerTask(Task):
    """Shared machinery of the ``-nl`` tasks: tokenization, single-token checks, padding."""

    toy_name: str = ""

    def __init__(self, tokenizer: Any = None, d_vocab: int | None = None) -> None:
        if tokenizer is None:
            raise CircuitkitError(
                f"task {self.name!r} builds its prompts with a Hugging Face tokenizer: pass "
                f"tokenizer=model.tokenizer, or use circuitkit.tasks.task_for_model({self.toy_name!r}, model), "
                f"which picks the toy task {self.toy_name!r} for toy models and {self.name!r} otherwise")
        self.tokenizer = tokenizer
        self.d_vocab = int(d_vocab) if d_vocab is not None else len(tokenizer)
        self.bos_id: int | None = tokenizer.bos_token_id
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        self.pad_id: int = 0 if pad is None else int(pad)

    # ----------------------------------------------------------------- tokenization

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (no automatic bos)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def pieces(self, text: str) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(self.encode(text)))

    def single_tokens(self, words: Sequence[str], what: str, need: int, option: str,
                      prefix: str = " ", strict: bool = False) -> tuple[list[str], torch.Tensor]:
        """The ``words`` that are one token after ``prefix``, and those tokens' ids ([n_kept]).

        ``strict`` (a list the caller passed in): any split word is an error. Otherwise split
        words are dropped, and it is an error only when fewer than ``need`` remain.
        """
        words = list(dict.fromkeys(words))
        encoded = self.encode_batch([prefix + w for w in words])
        kept = [(w, ids[0]) for w, ids in zip(words, encoded) if len(ids) == 1]
        split = [w for w, ids in zip(words, encoded) if len(ids) != 1]
        tok = tokenizer_name(self.tokenizer)
        if strict and split:
            w = split[0]
            raise CircuitkitError(
                f"task {self.name!r}: the {what} {w!r} is not one token for tokenizer {tok!r}: "
                f"{prefix + w!r} -> {self.pieces(prefix + w)}. Every {what} must be a single token "
                f"(with its leading space); drop it from {option}= or choose another word"
                + (f" (also split: {split[1:6]})" if len(split) > 1 else ""))
        if len(kept) < need:
            examples = "; ".join(f"{prefix + w!r} -> {self.pieces(prefix + w)}" for w in split[:3])
            raise CircuitkitError(
                f"task {self.name!r}: tokenizer {tok!r} keeps only {len(kept)} of {len(words)} {what}s "
                f"as one token ({[w for w, _ in kept]}), and the task needs at least {need}. Split, e.g.: "
                f"{examples}. Pass {option}=[...] with words that are single tokens for this tokenizer")
        ids = torch.tensor([i for _, i in kept], dtype=torch.long)
        if len(ids) and int(ids.max()) >= self.d_vocab:
            raise CircuitkitError(f"task {self.name!r}: tokenizer {tok!r} gives token ids up to {int(ids.max())}, "
                                  f"beyond the model's vocabulary of {self.d_vocab}; pass d_vocab=model.cfg.d_vocab "
                                  "and the model's own tokenizer")
        return [w for w, _ in kept], ids

    def _words(self, given: Sequence[str] | None, default: Sequence[str], what: str, need: int,
               option: str, prefix: str = " ") -> tuple[list[str], torch.Tensor]:
        """Answer-bearing words (names, arguments): each must be one token."""
        if given is not None and len(given) == 0:
            raise CircuitkitError(f"task {self.name!r}: {option}= is empty; give at least {need} {what}s")
        return self.single_tokens(default if given is None else given, what, need, option, prefix,
                                  strict=given is not None)

    def _fillers(self, given: Sequence[str] | None, default: Sequence[str], option: str,
                 prefix: str = " ") -> list[str]:
        """Context words and phrases (places, nouns, summaries): any token count works.

        Of the built-in list only the largest group with one token count is kept (the
        single-token words, for GPT-2), so prompts of one template have one length; a list
        the caller passes is used as given (the batch is padded where lengths differ).
        """
        words = list(dict.fromkeys(default if given is None else given))
        if not words:
            raise CircuitkitError(f"task {self.name!r}: {option}= is empty; give at least one word")
        if given is not None:
            return words
        groups: dict[int, list[str]] = {}
        for w, ids in zip(words, self.encode_batch([prefix + w for w in words])):
            groups.setdefault(len(ids), []).append(w)
        return max(sorted(groups.items()), key=lambda kv: len(kv[1]))[1]

    # ----------------------------------------------------------------- assembling batches

    def _with_bos(self, ids: list[int]) -> list[int]:
        return ids if self.bos_id is None else [self.bos_id] + ids

    def assemble(self, clean: list[list[int]], corrupt: list[list[int]],
                 texts: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-pad prompt pairs into ``clean`` [n, pos], ``corrupt`` [n, pos] and ``answer_pos`` [n, 1]."""
        for c, x, (tc, tx) in zip(clean, corrupt, texts):
            if len(c) != len(x):
                raise CircuitkitError(
                    f"task {self.name!r}: tokenizer {tokenizer_name(self.tokenizer)!r} gives the clean prompt "
                    f"{tc!r} {len(c)} tokens but its corrupted prompt {tx!r} {len(x)}; they must have the same "
                    "token length. Use names/words that are single tokens for this tokenizer")
        lengths = torch.tensor([len(c) for c in clean])
        return self._pad(clean), self._pad(corrupt), (lengths - 1)[:, None]

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:  # -> [n, max_len]
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        if int(out.max()) >= self.d_vocab:
            raise CircuitkitError(f"task {self.name!r}: token id {int(out.max())} is beyond the model's vocabulary "
                                  f"of {self.d_vocab}; use the model's own tokenizer (model.tokenizer)")
        return out

    def train_tokens(self, prompts: torch.Tensor, answer_pos: torch.Tensor,
                     answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts [n, pos] + answer tokens [n] written after each prompt's last token -> tokens, loss_mask."""
        n = prompts.shape[0]
        tokens = torch.cat([prompts, torch.full((n, 1), self.pad_id, dtype=torch.long)], dim=1)  # [n, pos + 1]
        last = answer_pos[:, 0]
        tokens[torch.arange(n), last + 1] = answers
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[torch.arange(n), last] = True
        return tokens, loss_mask

    def _template_index(self, template: int | None, n_templates: int) -> int | None:
        if template is None:
            return None
        if not isinstance(template, int) or not 0 <= template < n_templates:
            raise CircuitkitError(f"task {self.name!r}: template must be an index in [0, {n_templates}) or None "
                                  f"(a random template per example), got {template!r}")
        return template


# --------------------------------------------------------------------------- IOI

@register_task("ioi-nl")
class IOINL(TokenizerTask):
    """IOI in natural language; ``labels``: ``order`` (0 ABBA, 1 BABA), ``template``, ``io``, ``s``."""

    name = "ioi-nl"
    toy_name = "ioi"
    metric = Metric.LOGIT_DIFF

    def __init__(self, tokenizer: Any = None, d_vocab: int | None = None, order: str | None = None,
                 template: int | None = None, names: Sequence[str] | None = None,
                 places: Sequence[str] | None = None, objects: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None) -> None:
        super().__init__(tokenizer, d_vocab)
        if order is not None and order not in ("abba", "baba"):
            raise CircuitkitError(f"order must be 'abba', 'baba' or None (both), got {order!r}")
        self.order = order
        self.templates = list(templates) if templates is not None else list(IOI_TEMPLATES)
        for t in self.templates:
            if not all(k in t for k in ("{N1}", "{N2}", "{S}")):
                raise CircuitkitError(f"IOI template {t!r} needs the slots {{N1}}, {{N2}} and {{S}}")
        self.template = self._template_index(template, len(self.templates))
        # IO, S and three fresh ABC names that differ from both: five distinct names
        self.names, self.name_ids = self._words(names, IOI_NAMES, "name", 5, "names")
        self.places = self._fillers(places, IOI_PLACES, "places")
        self.objects = self._fillers(objects, IOI_OBJECTS, "objects")

    def _sample(self, n: int, g: torch.Generator) -> dict[str, Any]:
        names = sample_distinct(n, 2, len(self.names), g)  # [n, 2]: IO, S
        abc = sample_distinct(n, 3, len(self.names), g, exclude=names)  # [n, 3]
        if self.order is None:
            order = torch.randint(2, (n,), generator=g)
        else:
            order = torch.full((n,), ("abba", "baba").index(self.order), dtype=torch.long)
        if self.template is None:
            tmpl = torch.randint(len(self.templates), (n,), generator=g)
        else:
            tmpl = torch.full((n,), self.template, dtype=torch.long)
        place = torch.randint(len(self.places), (n,), generator=g)
        obj = torch.randint(len(self.objects), (n,), generator=g)
        texts = []
        for b in range(n):
            io, s = self.names[names[b, 0]], self.names[names[b, 1]]
            n1, n2 = (s, io) if order[b] else (io, s)
            fill = dict(PLACE=self.places[place[b]], OBJECT=self.objects[obj[b]])
            t = self.templates[tmpl[b]]
            c1, c2, c3 = (self.names[i] for i in abc[b].tolist())
            texts.append((t.format(N1=n1, N2=n2, S=s, **fill), t.format(N1=c1, N2=c2, S=c3, **fill)))
        clean = [self._with_bos(x) for x in self.encode_batch([c for c, _ in texts])]
        corrupt = [self._with_bos(x) for x in self.encode_batch([x for _, x in texts])]
        clean_t, corrupt_t, answer_pos = self.assemble(clean, corrupt, texts)
        return dict(clean=clean_t, corrupt=corrupt_t, answer_pos=answer_pos, io=self.name_ids[names[:, 0]],
                    s=self.name_ids[names[:, 1]], order=order, template=tmpl)

    def dataset(self, n: int, seed: int = 0) -> TaskDataset:
        check_n(n)
        p = self._sample(n, torch.Generator().manual_seed(seed))
        return TaskDataset(task=self.name, clean=p["clean"], corrupt=p["corrupt"], answer_pos=p["answer_pos"],
                           correct=p["io"][:, None], distractors=p["s"][:, None, None], metric=self.metric,
                           labels={k: p[k] for k in ("order", "template", "io", "s")})

    def train_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_n(n)
        p = self._sample(n, generator)
        return self.train_tokens(p["clean"], p["answer_pos"], p["io"])


# --------------------------------------------------------------------------- greater-than

@register_task("greater-than-nl")
class GreaterThanNL(TokenizerTask):
    """Greater-than in natural language; ``labels["yy"]`` is the start year's last two digits.

    ``year_ids[v]`` is the tokenizer's token for the two digits ``v`` (-1 if it has none);
    the correct and distractor sets are over those tokens.
    """

    name = "greater-than-nl"
    toy_name = "greater-than"
    metric = Metric.PROB_DIFF

    def __init__(self, tokenizer: Any = None, d_vocab: int | None = None,
                 nouns: Sequence[str] | None = None) -> None:
        super().__init__(tokenizer, d_vocab)
        self.nouns = self._fillers(nouns, GT_NOUNS, "nouns")
        tok = tokenizer_name(tokenizer)
        century = self.encode(" " + GT_CENTURY)
        if len(century) != 1:
            raise CircuitkitError(f"task {self.name!r}: tokenizer {tok!r} splits ' {GT_CENTURY}' into "
                                  f"{self.pieces(' ' + GT_CENTURY)}; the task needs it as one token")
        self.century_id = century[0]
        two = [f"{v:02d}" for v in range(100)]
        year_ids = [ids[0] if len(ids) == 1 else -1 for ids in self.encode_batch(two)]
        self.year_ids = torch.tensor(year_ids, dtype=torch.long)  # [100]
        if int(self.year_ids.max()) >= self.d_vocab:
            raise CircuitkitError(f"task {self.name!r}: year tokens lie beyond the model's vocabulary of "
                                  f"{self.d_vocab}; use the model's own tokenizer")
        # a start year works when " 17YY" is written as " 17" + "YY", as GPT-2 does
        full = self.encode_batch([f" {GT_CENTURY}{y}" for y in two])
        self.year_ok = torch.tensor([year_ids[v] >= 0 and full[v] == [self.century_id, year_ids[v]]
                                     for v in range(100)])  # [100] bool
        if not self.year_ok[GT_CORRUPT_YY]:
            raise CircuitkitError(f"task {self.name!r}: tokenizer {tok!r} writes ' {GT_CENTURY}01' as "
                                  f"{self.pieces(f' {GT_CENTURY}01')}, not ' {GT_CENTURY}' + '01'; the corrupted "
                                  "prompt needs that split")
        has_above = torch.tensor([bool((self.year_ids[v + 1 :] >= 0).any()) for v in range(100)])
        start_ok = self.year_ok & has_above
        start_ok[:2] = False  # YY in 02..98, as in the toy task
        start_ok[99] = False
        self.start_years = start_ok.nonzero().squeeze(-1)  # [n_start]
        if len(self.start_years) == 0:
            bad = f" {GT_CENTURY}32"
            raise CircuitkitError(f"task {self.name!r}: tokenizer {tok!r} splits no year ' 17YY' into ' 17' + 'YY' "
                                  f"(e.g. {bad!r} -> {self.pieces(bad)}); greater-than needs two-digit year tokens")

    def _sample(self, n: int, g: torch.Generator) -> dict[str, Any]:
        yy = self.start_years[torch.randint(len(self.start_years), (n,), generator=g)]  # [n]
        noun = torch.randint(len(self.nouns), (n,), generator=g)
        texts = [(GT_TEMPLATE.format(NOUN=self.nouns[noun[b]], YY=f"{int(yy[b]):02d}"),
                  GT_TEMPLATE.format(NOUN=self.nouns[noun[b]], YY=f"{GT_CORRUPT_YY:02d}")) for b in range(n)]
        clean = [self._with_bos(x) for x in self.encode_batch([c for c, _ in texts])]
        corrupt = [self._with_bos(x) for x in self.encode_batch([x for _, x in texts])]
        for b, (c, (text, _)) in enumerate(zip(clean, texts)):
            at = c.index(self.century_id) if self.century_id in c else -2
            if c[at + 1] != int(self.year_ids[yy[b]]) or c[-1] != self.century_id:
                raise CircuitkitError(f"task {self.name!r}: tokenizer {tokenizer_name(self.tokenizer)!r} does not "
                                      f"write the year of {text!r} as ' 17' + 'YY' in context: "
                                      f"{self.tokenizer.convert_ids_to_tokens(c)}")
        clean_t, corrupt_t, answer_pos = self.assemble(clean, corrupt, texts)
        return dict(clean=clean_t, corrupt=corrupt_t, answer_pos=answer_pos, yy=yy)

    def dataset(self, n: int, seed: int = 0) -> TaskDataset:
        check_n(n)
        g = torch.Generator().manual_seed(seed)
        p = self._sample(n, g)
        yy = p["yy"]
        correct_set, distractor_set = year_sets(yy, self.year_ids, self.d_vocab)
        label = self.year_ids[sample_above(yy, self.year_ids >= 0, g)]
        return TaskDataset(task=self.name, clean=p["clean"], corrupt=p["corrupt"], answer_pos=p["answer_pos"],
                           correct=label[:, None], distractors=self.year_ids[yy][:, None, None],
                           metric=self.metric, correct_set=correct_set, distractor_set=distractor_set,
                           labels={"yy": yy})

    def train_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_n(n)
        p = self._sample(n, generator)
        target = self.year_ids[sample_above(p["yy"], self.year_ids >= 0, generator)]
        return self.train_tokens(p["clean"], p["answer_pos"], target)


# --------------------------------------------------------------------------- docstring

@register_task("docstring-nl")
class DocstringNL(TokenizerTask):
    """Docstring completion as Python source; ``labels["args"]`` holds the A, B, C token ids."""

    name = "docstring-nl"
    toy_name = "docstring"
    metric = Metric.LOGIT_DIFF

    def __init__(self, tokenizer: Any = None, d_vocab: int | None = None,
                 args: Sequence[str] | None = None, funcs: Sequence[str] | None = None) -> None:
        super().__init__(tokenizer, d_vocab)
        # three arguments and three fresh ones for the corruption: six distinct names
        self.args, self.arg_ids = self._words(args, DOC_ARGS, "argument name", 6, "args")
        self.funcs = self._fillers(funcs, DOC_FUNCS, "funcs")
        self.summaries = self._fillers(None, DOC_SUMMARIES, "summaries", prefix="")
        self.desc_words = self._fillers(None, DOC_WORDS, "words")

    def _sample(self, n: int, g: torch.Generator) -> dict[str, Any]:
        arg_idx = sample_distinct(n, 3, len(self.args), g)  # [n, 3]
        fresh = sample_distinct(n, 3, len(self.args), g, exclude=arg_idx)  # [n, 3]
        func = torch.randint(len(self.funcs), (n,), generator=g)
        summary = torch.randint(len(self.summaries), (n,), generator=g)
        desc = torch.randint(len(self.desc_words), (n, N_DOC_WORDS), generator=g)
        texts = []
        for b in range(n):
            fill = dict(F=self.funcs[func[b]], SUMMARY=self.summaries[summary[b]],
                        **{f"D{k + 1}": self.desc_words[desc[b, k]] for k in range(N_DOC_WORDS)})
            a, bb, c = (self.args[i] for i in arg_idx[b].tolist())
            fa, fb, fc = (self.args[i] for i in fresh[b].tolist())
            texts.append((DOC_TEMPLATE.format(A=a, B=bb, C=c, **fill),
                          DOC_TEMPLATE.format(A=fa, B=fb, C=fc, **fill)))
        clean = [self._with_bos(x) for x in self.encode_batch([c for c, _ in texts])]
        corrupt = [self._with_bos(x) for x in self.encode_batch([x for _, x in texts])]
        clean_t, corrupt_t, answer_pos = self.assemble(clean, corrupt, texts)
        return dict(clean=clean_t, corrupt=corrupt_t, answer_pos=answer_pos, args=self.arg_ids[arg_idx])

    def dataset(self, n: int, seed: int = 0) -> TaskDataset:
        check_n(n)
        p = self._sample(n, torch.Generator().manual_seed(seed))
        args = p["args"]
        return TaskDataset(task=self.name, clean=p["clean"], corrupt=p["corrupt"], answer_pos=p["answer_pos"],
                           correct=args[:, 2:3], distractors=args[:, None, :2], metric=self.metric,
                           labels={"args": args})

    def train_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_n(n)
        p = self._sample(n, generator)
        return self.train_tokens(p["clean"], p["answer_pos"], p["args"][:, 2])


# --------------------------------------------------------------------------- induction

@register_task("induction-nl")
class InductionNL(TokenizerTask):
    """Toy induction's layout on random (non-special) token ids of a real tokenizer."""

    name = "induction-nl"
    toy_name = "induction"
    metric = Metric.LOGIT_DIFF

    def __init__(self, tokenizer: Any = None, d_vocab: int | None = None) -> None:
        super().__init__(tokenizer, d_vocab)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        size = min(len(tokenizer), self.d_vocab)
        self.pool = torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)  # [n_pool]
        if len(self.pool) < toy_induction.N_DISTINCT:
            raise CircuitkitError(f"task {self.name!r}: tokenizer {tokenizer_name(tokenizer)!r} has only "
                                  f"{len(self.pool)} ordinary tokens; induction needs {toy_induction.N_DISTINCT}")

    def dataset(self, n: int, seed: int = 0) -> TaskDataset:
        return toy_induction.dataset_from_pool(self.name, self.pool, self.bos_id, n, seed)

    def train_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return toy_induction.train_batch_from_pool(self.pool, self.bos_id, n, generator)
