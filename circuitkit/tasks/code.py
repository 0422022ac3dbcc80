'''Code tasks for language models trained on code (``code-lm``), built with the model's tokenizer.

A model trained on the standard library's source (:mod:`circuitkit.corpus`) has circuits of
its own kind: copying an identifier it saw, repeating a line. These tasks pose them as
clean/corrupted prompt pairs in the corpus's style (4-space indents, the tokenizer's own
newline-plus-indent tokens), under the same :class:`~circuitkit.tasks.base.TaskDataset`
contract as every other task, so every circuit method and the study run on them unchanged:

- ``code-induction``: a real stretch of **held-out** code (``length`` tokens from a line's
  newline-plus-indent token), then its first ``prefix`` tokens again → the next token of the repeat.
  The token before the answer occurs once in the stretch and the answer is not among the
  repeated tokens, so only the first occurrence says what comes next. Corrupted: the first
  occurrence replaced by another held-out stretch of the same length that contains neither
  the last prompt token nor the answer (nothing to induce from); the distractor is the token
  at the answer's offset in that stretch (what copying by position would give).
- ``code-args``: ``def __init__(self, A, B, C):`` with two of the three stored as
  ``self.X = X`` → ``self.R =`` → `` R``, the right name among three in context (IOI-like;
  distractors: the other two arguments). Corrupted: all names resampled.
- ``code-kwargs``: ``def f(self, A, B, C):`` then ``return g(P=P, Q=Q, R=`` → ``R``
  (keyword pass-through, the stdlib's most common call shape); distractors: the other two.
- ``code-return``: ``def f(A, B):`` / ``C = g(A, B)`` / ``return`` → `` C``, the local just
  bound rather than an argument (distractors: the arguments).
- ``code-quote``: ``    A = 'W`` → ``'`` (closing what was opened): a string opened with one
  quote is closed with the same one. Corrupted: the same line opened with the other quote, so
  the answer and the distractor swap (a one-token corruption, as IOI's).
- ``code-key``: ``        A['W`` → ``']``, a subscript by a string key: the answer closes the
  string and the bracket in one token (``']`` or ``"]``); corrupted as code-quote.

Identifiers come from :data:`CODE_NAMES` (common stdlib parameter names), filtered to those
that are one token both with a leading space (`` beta`` in an argument list) and without
(``beta`` after ``self.`` or ``=``), so clean and corrupted prompts have equal token length;
a list passed as ``names=`` must be all single tokens. Every template prompt is checked
against the tokenizer: tokenizing the prompt followed by the answer must give the prompt's
tokens plus exactly the answer token, so the answer is what the text implies. A tokenizer
that cannot express a task (too few single-token names, no newline token, too little
held-out code) gets a :class:`~circuitkit.CircuitkitError` that says what is missing.

Construct them with ``tokenizer=model.tokenizer`` and ``d_vocab=model.cfg.d_vocab``, or with
:func:`circuitkit.tasks.task_for_model`, which passes the tokenizer to every ``code-`` task.
'''

from __future__ import annotations

from typing import Any, Sequence

import torch

from circuitkit import CircuitkitError
from circuitkit.corpus import code_corpus
from circuitkit.tasks.base import Metric, TaskDataset, check_n, register_task
from circuitkit.tasks.nl import TokenizerTask, tokenizer_name
from circuitkit.tasks.sampling import sample_distinct

CODE_PREFIX = "code-"

# Common parameter and local names of the standard library, letters only (an underscore is a
# token boundary for the byte-level pre-tokenizer, so snake_case names are never one token).
CODE_NAMES = ["name", "value", "key", "data", "path", "mode", "size", "count", "index", "item", "text", "line",
              "start", "end", "stop", "step", "width", "height", "default", "func", "obj", "result", "source",
              "target", "prefix", "suffix", "sep", "level", "flags", "encoding", "errors", "timeout", "offset",
              "length", "limit", "parent", "node", "root", "entry", "filename", "module", "parser", "options",
              "config", "context", "state", "handler", "callback", "stream", "file", "msg", "message", "code",
              "status", "reason", "host", "port", "address", "user", "token", "header", "headers", "body",
              "request", "response", "url", "query", "params", "fields", "values", "keys", "pattern", "string",
              "number", "total", "base", "scale", "factor", "delta", "shift", "mask", "args", "kwargs", "attrs",
              "tag", "kind", "label", "title", "format", "action", "method", "version", "section", "option",
              "sock", "buf", "data", "chunk", "block", "frame", "event", "task", "loop", "future", "signal"]
CODE_CLASSES = ["Parser", "Reader", "Writer", "Handler", "Config", "Record", "Entry", "Node", "Server", "Client",
                "Request", "Response", "Message", "Stream", "Buffer", "Loader", "Manager", "Context"]
CODE_FUNCS = ["load", "save", "parse", "read", "write", "open", "close", "send", "update", "check", "build",
              "get", "set", "run", "call", "format", "make", "create", "find", "copy"]

ARGS_TEMPLATE = ("class {CLS}:\n\n    def __init__(self, {A}, {B}, {C}):\n        self.{P} = {P}\n"
                 "        self.{Q} = {Q}\n        self.{R} =")
KWARGS_TEMPLATE = "    def {F}(self, {A}, {B}, {C}):\n        return self.{G}({P}={P}, {Q}={Q}, {R}="
RETURN_TEMPLATE = "def {F}({A}, {B}):\n    {C} = {G}({A}, {B})\n    return"


def is_code_task(name: str) -> bool:
    return name.startswith(CODE_PREFIX)


class CodeTask(TokenizerTask):
    """Shared machinery of the ``code-`` tasks: a tokenizer is required, names are one token both ways."""

    def __init__(self, tokenizer: Any = None, d_vocab: int | None = None) -> None:
        if tokenizer is None:
            raise CircuitkitError(
                f"task {self.name!r} builds its prompts with the model's tokenizer: pass tokenizer=model.tokenizer "
                f"and d_vocab=model.cfg.d_vocab, or use circuitkit.tasks.task_for_model({self.name!r}, model) with "
                "a model that has a tokenizer (a language model trained here, such as code-lm)")
        super().__init__(tokenizer, d_vocab)

    def code_names(self, given: Sequence[str] | None, need: int,
                   option: str = "names") -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Names that are one token with and without a leading space; their ids ``spaced``, ``bare`` ([n_kept])."""
        if given is not None and len(given) == 0:
            raise CircuitkitError(f"task {self.name!r}: {option}= is empty; give at least {need} identifiers")
        default = CODE_NAMES if option == "names" else CODE_FUNCS
        words = [w for w in dict.fromkeys(default if given is None else given)]
        bad = [w for w in words if not (isinstance(w, str) and w.isascii() and w.isidentifier())]
        if bad:
            raise CircuitkitError(f"task {self.name!r}: {bad[:5]} are not Python identifiers; {option}= must hold "
                                  "identifiers such as 'alpha'")
        spaced_words, spaced = self.single_tokens(words, "identifier", need, option, prefix=" ",
                                                  strict=given is not None)
        bare_words, bare = self.single_tokens(spaced_words, "identifier", need, option, prefix="",
                                              strict=given is not None)
        keep = set(bare_words)
        spaced = torch.tensor([i for w, i in zip(spaced_words, spaced.tolist()) if w in keep], dtype=torch.long)
        return bare_words, spaced, bare

    def check_answers(self, texts: Sequence[str], prompts: list[list[int]], answers: Sequence[str],
                      answer_ids: torch.Tensor) -> None:
        """Tokenizing ``text + answer`` must give the prompt's tokens and then exactly the answer token."""
        full = self.encode_batch([t + a for t, a in zip(texts, answers)])
        for b, (text, ids, f) in enumerate(zip(texts, prompts, full)):
            body = ids[1:] if self.bos_id is not None else ids
            if f != body + [int(answer_ids[b])]:
                raise CircuitkitError(
                    f"task {self.name!r}: tokenizer {tokenizer_name(self.tokenizer)!r} does not write the answer "
                    f"{answers[b]!r} after {text[-40:]!r} as one separate token ({self.tokenizer.convert_ids_to_tokens(f[-3:])}); "
                    "choose names= that are single tokens in this position")

    # Every code task samples the same standard keys: ``clean``, ``corrupt`` [n, pos],
    # ``answer_pos`` [n, 1], ``correct`` [n], ``distractors`` [n, k], plus its ``label_keys``, and
    # ``position_labels`` (names of the positions) where every prompt has the same layout.
    label_keys: tuple[str, ...] = ()

    def _sample(self, n: int, gen: torch.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def dataset(self, n: int, seed: int = 0) -> TaskDataset:
        check_n(n)
        p = self._sample(n, torch.Generator().manual_seed(seed))
        return TaskDataset(task=self.name, clean=p["clean"], corrupt=p["corrupt"], answer_pos=p["answer_pos"],
                           correct=p["correct"][:, None], distractors=p["distractors"][:, None, :],
                           metric=self.metric, labels={k: p[k] for k in self.label_keys},
                           position_labels=p.get("position_labels"))

    def train_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_n(n)
        p = self._sample(n, generator)
        return self.train_tokens(p["clean"], p["answer_pos"], p["correct"])


# --------------------------------------------------------------------------- name-copying templates

class NameCopyTask(CodeTask):
    """A template whose answer is one of ``n_args`` names in context; corrupted = all names resampled.

    ``labels["names"]`` holds the (spaced) token ids of the clean names in template slot order,
    ``labels["answer_slot"]`` which slot is the answer.
    """

    template: str
    n_args: int
    answer_space: bool  # the answer is written with a leading space (" beta") or without ("beta")
    metric = Metric.LOGIT_DIFF
    label_keys = ("names", "answer_slot")

    def __init__(self, tokenizer: Any = None, d_vocab: int | None = None, names: Sequence[str] | None = None,
                 classes: Sequence[str] | None = None, funcs: Sequence[str] | None = None,
                 in_order: bool = False) -> None:
        super().__init__(tokenizer, d_vocab)
        # in_order: the names are used in signature order, so the answer is also the next one by position
        # (an easier variant); by default the order is random and only the name itself says which
        self.in_order = bool(in_order)
        # n_args clean names and n_args fresh ones for the corruption
        self.names, self.spaced_ids, self.bare_ids = self.code_names(names, 2 * self.n_args)
        # class names follow "class "; function names follow "def ", "= " or "self.": one token both ways
        self.classes = self._fillers(classes, CODE_CLASSES, "classes")
        self.funcs, _, _ = self.code_names(funcs, 2, option="funcs")

    def fill(self, names: list[str], order: list[int], cls: str, f: str, g: str) -> str:
        """The template with the names in signature order (A, B, C) and in use order (P, Q, R = the answer)."""
        a, b, c = names
        p, q, r = (names[k] for k in order)
        return self.template.format(CLS=cls, F=f, G=g, A=a, B=b, C=c, P=p, Q=q, R=r)

    def _sample(self, n: int, gen: torch.Generator) -> dict[str, Any]:
        idx = sample_distinct(n, self.n_args, len(self.names), gen)  # [n, n_args]
        fresh = sample_distinct(n, self.n_args, len(self.names), gen, exclude=idx)  # [n, n_args]
        order = torch.rand(n, self.n_args, generator=gen).argsort(-1)  # [n, n_args]; last = answer slot
        if self.in_order:
            order = torch.arange(self.n_args).expand(n, -1).clone()
        cls = torch.randint(len(self.classes), (n,), generator=gen)
        fg = sample_distinct(n, 2, len(self.funcs), gen)  # [n, 2]
        texts, answers = [], []
        for b in range(n):
            o = order[b].tolist()
            extra = dict(cls=self.classes[cls[b]], f=self.funcs[fg[b, 0]], g=self.funcs[fg[b, 1]])
            clean = self.fill([self.names[i] for i in idx[b].tolist()], o, **extra)
            corrupt = self.fill([self.names[i] for i in fresh[b].tolist()], o, **extra)
            texts.append((clean, corrupt))
            answers.append((" " if self.answer_space else "") + self.names[int(idx[b, o[-1]])])
        clean = [self._with_bos(x) for x in self.encode_batch([c for c, _ in texts])]
        corrupt = [self._with_bos(x) for x in self.encode_batch([x for _, x in texts])]
        slot = order[:, -1]  # [n]
        answer_name = idx.gather(1, slot[:, None])[:, 0]  # [n] index into self.names
        ids = self.spaced_ids if self.answer_space else self.bare_ids
        correct = ids[answer_name]  # [n]
        self.check_answers([c for c, _ in texts], clean, answers, correct)
        clean_t, corrupt_t, answer_pos = self.assemble(clean, corrupt, texts)
        others = order[:, :-1]  # [n, n_args - 1]: the other slots
        distract = ids[idx.gather(1, others)]  # [n, n_args - 1]
        return dict(clean=clean_t, corrupt=corrupt_t, answer_pos=answer_pos, correct=correct,
                    distractors=distract, names=self.spaced_ids[idx], answer_slot=slot)


@register_task("code-args")
class CodeArgs(NameCopyTask):
    """``def __init__(self, A, B, C):`` storing two of them, then ``self.R =`` → `` R``."""

    name = "code-args"
    template = ARGS_TEMPLATE
    n_args = 3
    answer_space = True


@register_task("code-kwargs")
class CodeKwargs(NameCopyTask):
    """``def f(self, A, B, C):`` then ``return self.g(P=P, Q=Q, R=`` → ``R``."""

    name = "code-kwargs"
    template = KWARGS_TEMPLATE
    n_args = 3
    answer_space = False


@register_task("code-return")
class CodeReturn(NameCopyTask):
    """``def f(A, B):`` / ``C = g(A, B)`` / ``return`` → `` C`` (the bound local, not an argument)."""

    name = "code-return"
    template = RETURN_TEMPLATE
    n_args = 3
    answer_space = True

    def fill(self, names, order, cls, f, g):
        # slot 2 (C) is always the answer here: rotate so the sampled answer slot lands on C
        r = order[-1]
        a, b = (names[k] for k in range(3) if k != r)
        return self.template.format(F=f, G=g, A=a, B=b, C=names[r])


# --------------------------------------------------------------------------- closing a string

@register_task("code-quote")
class CodeQuote(CodeTask):
    """``    A = 'W`` → ``'``: the closing quote is the one that opened the string.

    ``words`` identifiers (1–3, space-separated) form the string, so the opening quote is
    ``words`` tokens before the answer. A subclass changes the line (``template``, with ``{A}``
    the target and ``{O}`` the opener) and what opens and closes the string (``opener`` /
    ``closer``, one text per quote, each one token). Words are kept only where the tokenizer
    writes opener, word and closer as three tokens (the byte-level pre-tokenizer splits ``'s``,
    ``'t``, ``'d``, … as contractions, so ``'size`` is not ``'`` + ``size``).
    ``labels["quote"]``: 0 for ``'``, 1 for ``"`` in the clean prompt.
    """

    name = "code-quote"
    metric = Metric.LOGIT_DIFF
    label_keys = ("quote",)
    template = "    {A} ={O}{W}"  # the opener carries its leading space
    opener = (" '", ' "')
    closer = ("'", '"')
    head_labels = ("target", "=", "open quote")  # the labels of the tokens from {A} to the opener

    def __init__(self, tokenizer: Any = None, d_vocab: int | None = None, names: Sequence[str] | None = None,
                 words: int = 1) -> None:
        super().__init__(tokenizer, d_vocab)
        if not (isinstance(words, int) and not isinstance(words, bool) and 1 <= words <= 3):
            raise CircuitkitError(f"task {self.name!r}: words= is the number of identifiers inside the string, "
                                  f"1 to 3; got {words!r}")
        self.words = words
        names, _, _ = self.code_names(names, words + 1)
        # the closers are the answer tokens; keep the words that each quote leaves whole
        self.close_ids = torch.tensor([self._one_token(c) for c in self.closer])  # [2]
        open_ids = [self._one_token(o) for o in self.opener]
        ok = [w for w in names if all(self.encode(f"{o}{w}{c}") == [oi, *self.encode(w), int(ci)]
                                      for o, c, oi, ci in zip(self.opener, self.closer, open_ids, self.close_ids))]
        if len(ok) < words + 1:
            raise CircuitkitError(f"task {self.name!r}: only {len(ok)} of the names are written by tokenizer "
                                  f"{tokenizer_name(self.tokenizer)!r} as opener + name + closer in separate tokens; "
                                  f"need {words + 1}. Pass names= of plain identifiers such as 'value'")
        self.names = ok

    def _one_token(self, text: str) -> int:
        ids = self.encode(text)
        if len(ids) != 1:
            raise CircuitkitError(f"task {self.name!r}: tokenizer {tokenizer_name(self.tokenizer)!r} writes {text!r} "
                                  f"as {len(ids)} tokens; the task needs it as one (a byte-level BPE trained on code has it)")
        return ids[0]

    def _position_labels(self, length: int) -> tuple[str, ...] | None:
        """``bos``, the indent pieces, ``head_labels`` (target ... opener), the words."""
        n_prefix = length - len(self.head_labels) - self.words
        if n_prefix < 1:
            return None
        head = ["bos"] if self.bos_id is not None else []
        rest = n_prefix - len(head)
        head += ["indent"] if rest == 1 else [f"indent{i + 1}" for i in range(rest)]
        words = ["word"] if self.words == 1 else [f"word{i + 1}" for i in range(self.words)]
        return (*head, *self.head_labels, *words)

    def _sample(self, n: int, gen: torch.Generator) -> dict[str, Any]:
        idx = sample_distinct(n, self.words + 1, len(self.names), gen)  # [n, 1 + words]: target, then words
        quote = torch.randint(2, (n,), generator=gen)  # [n] 0 = ', 1 = "
        texts = []
        for b in range(n):
            target, *words = (self.names[i] for i in idx[b].tolist())
            q = int(quote[b])
            texts.append(tuple(self.template.format(A=target, O=self.opener[k], W=" ".join(words)) for k in (q, 1 - q)))
        clean = [self._with_bos(x) for x in self.encode_batch([c for c, _ in texts])]
        corrupt = [self._with_bos(x) for x in self.encode_batch([x for _, x in texts])]
        correct = self.close_ids[quote]  # [n]
        self.check_answers([c for c, _ in texts], clean, [self.closer[int(q)] for q in quote], correct)
        clean_t, corrupt_t, answer_pos = self.assemble(clean, corrupt, texts)
        if len({len(c) for c in clean}) != 1:
            raise CircuitkitError(f"task {self.name!r}: tokenizer {tokenizer_name(self.tokenizer)!r} gives the prompts "
                                  "different token lengths (an indent or a name is split differently); pass names= "
                                  "that are single tokens")
        return dict(clean=clean_t, corrupt=corrupt_t, answer_pos=answer_pos, correct=correct,
                    distractors=self.close_ids[1 - quote][:, None], quote=quote,
                    position_labels=self._position_labels(clean_t.shape[1]))


@register_task("code-key")
class CodeKey(CodeQuote):
    """``        A['W`` → ``']``: a string subscript closes its string and its bracket in one token."""

    name = "code-key"
    template = "        {A}{O}{W}"
    opener = ("['", '["')
    closer = ("']", '"]')
    head_labels = ("target", "open quote")


# --------------------------------------------------------------------------- induction on held-out code

@register_task("code-induction")
class CodeInduction(CodeTask):
    """A held-out stretch of code from a line start, then its first ``prefix`` tokens again → the next one.

    Prompts are ``<bos> s[0..length) s[0..prefix)``, all of one length, answer at the last
    position; ``s[0]`` is the newline-plus-indent token that starts the line, so the repeat
    reads as the line written again. ``texts=`` replaces the corpus's held-out files (tests); otherwise
    ``corpus`` (``stdlib`` or ``stdlib:FOLDER``) is built with ``corpus_seed`` and
    ``heldout_fraction`` as the model was trained, and only its held-out files are read.
    ``words_only`` keeps only answers that hold a letter (identifier pieces, keywords).
    ``labels``: ``start`` and ``corrupt_start`` (indices of the clean and corrupting stretches).
    """

    name = "code-induction"
    metric = Metric.LOGIT_DIFF
    label_keys = ("start", "corrupt_start")

    def __init__(self, tokenizer: Any = None, d_vocab: int | None = None, length: int = 16, prefix: int = 8,
                 corpus: str = "stdlib", corpus_seed: int = 0, heldout_fraction: float = 0.05,
                 texts: Sequence[str] | None = None, words_only: bool = False) -> None:
        super().__init__(tokenizer, d_vocab)
        if not (isinstance(length, int) and isinstance(prefix, int) and 2 <= prefix < length):
            raise CircuitkitError(f"task {self.name!r}: need 2 <= prefix < length (tokens; the repeat starts with the "
                                  f"newline token), got prefix={prefix!r}, length={length!r}")
        self.length, self.prefix = length, prefix
        self.words_only = bool(words_only)  # answers restricted to tokens holding a letter (identifier pieces)
        size = min(len(self.tokenizer), self.d_vocab)
        pieces = [self.tokenizer.decode([i]) for i in range(size)]
        self.has_letter = torch.zeros(self.d_vocab, dtype=torch.bool)  # [d_vocab]
        self.has_letter[:size] = torch.tensor([any(c.isalpha() for c in p) for p in pieces])
        self.line_start = torch.zeros(self.d_vocab, dtype=torch.bool)  # [d_vocab]: whitespace tokens holding a newline
        self.line_start[:size] = torch.tensor([p.strip() == "" and "\n" in p for p in pieces])
        if texts is None:
            texts = code_corpus(corpus, seed=corpus_seed, heldout_fraction=heldout_fraction).texts("heldout")
        self.windows = self._windows(list(texts))  # [n_windows, length]
        if len(self.windows) < 2:
            raise CircuitkitError(f"task {self.name!r}: the held-out code yields {len(self.windows)} stretch(es) of "
                                  f"{length} tokens that start with a newline token; need at least 2 (more held-out "
                                  "code, a smaller length=, or a tokenizer with newline tokens)")
        self.pool = self._usable().nonzero().squeeze(-1)  # [n_pool] windows a clean prompt can come from

    def _windows(self, texts: list[str]) -> torch.Tensor:  # -> [n_windows, length]
        """Every ``length``-token stretch that starts with a newline token (newline plus indent)."""
        special = torch.zeros(self.d_vocab, dtype=torch.bool)
        special[[i for i in (getattr(self.tokenizer, "all_special_ids", []) or []) if i < self.d_vocab]] = True
        rows = []
        for ids in self.encode_batch(texts):
            t = torch.tensor(ids, dtype=torch.long)
            if t.numel() < self.length or int(t.max()) >= self.d_vocab:
                continue
            w = t.unfold(0, self.length, 1)  # [n_pos, length]
            rows.append(w[self.line_start[w[:, 0]] & ~special[w].any(-1)])
        return torch.cat(rows) if rows else torch.empty(0, self.length, dtype=torch.long)

    def _usable(self) -> torch.Tensor:  # -> [n_windows] bool
        """The token before the answer occurs once in the stretch; the answer is not among the repeated tokens."""
        w, k = self.windows, self.prefix
        last, ans = w[:, k - 1], w[:, k]  # [n_windows]
        ok = ((w == last[:, None]).sum(-1) == 1) & ~(w[:, :k] == ans[:, None]).any(-1)
        return ok & self.has_letter[ans] if self.words_only else ok

    def _sample(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        k = self.prefix
        pool = self.pool
        if len(pool) == 0:
            raise CircuitkitError(f"task {self.name!r}: no held-out stretch of {self.length} tokens has a unique token "
                                  f"at offset {k - 1}; use more held-out code or another prefix=")
        start = pool[torch.randint(len(pool), (n,), generator=gen)]  # [n]
        corrupt_start = torch.empty(n, dtype=torch.long)
        for b in range(n):
            w = self.windows[start[b]]
            last, ans = int(w[k - 1]), int(w[k])
            for _ in range(1000):
                c = int(torch.randint(len(self.windows), (1,), generator=gen))
                o = self.windows[c]
                if c != int(start[b]) and last not in o.tolist() and ans not in o.tolist() and int(o[k]) != ans:
                    corrupt_start[b] = c
                    break
            else:
                raise CircuitkitError(f"task {self.name!r}: found no held-out stretch free of the tokens "
                                      f"{self.tokenizer.convert_ids_to_tokens([last, ans])} to corrupt with")
        first, other = self.windows[start], self.windows[corrupt_start]  # [n, length]
        bos = torch.full((n, 0 if self.bos_id is None else 1), self.bos_id or 0, dtype=torch.long)
        clean = torch.cat([bos, first, first[:, :k]], dim=1)  # [n, 1 + length + prefix]
        corrupt = torch.cat([bos, other, first[:, :k]], dim=1)
        assert clean.shape == corrupt.shape
        return dict(clean=clean, corrupt=corrupt, correct=first[:, k], distractors=other[:, k, None],
                    answer_pos=torch.full((n, 1), clean.shape[1] - 1, dtype=torch.long),
                    start=start, corrupt_start=corrupt_start)
