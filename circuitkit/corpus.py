"""Text corpora: where the text that trains or post-trains a language model comes from.

Owns every corpus circuitkit reads, and the tokenizer trained on one:

- the **standard-library code corpus** (``stdlib``): the running interpreter's own ``.py``
  files, chosen by a fixed rule (:func:`select_python_files`: test suites, demos, generated
  tables and bundled third-party code are left out), split into train and held-out **by
  file** with a fixed seed, and identified by a manifest (:class:`FileCorpus`: each file with
  its sha256, and one hash of the whole), so two machines can tell whether they built the same
  corpus. ``stdlib:FOLDER`` applies the same rule to another folder (tests use a tiny one).
- local ``.txt`` files (one document each), ``.jsonl`` files (one document per line: a JSON
  string or an object with a ``text`` field), a folder of those, or a Hugging Face dataset
  written ``hf:NAME`` or ``hf:NAME:CONFIG`` (needs the ``datasets`` package and either network
  access or a local cache); their last ``heldout_fraction`` of sequences are held out.
- a byte-level BPE tokenizer trained on a corpus's train split with Hugging Face
  ``tokenizers`` (:func:`train_tokenizer`), one end-of-text token that also serves as BOS and
  padding; :func:`circuitkit.models.load_model` sets it on the model from ``tokenizer.json``.
- the bigram baseline a language model's held-out CE is read against (:func:`bigram_ce`).

Documents are tokenised, joined with the end-of-text token and either cut into fixed-length
rows (held-out evaluation) or sampled as windows at random offsets of the train stream
(training, :meth:`TextCorpus.sample`); every row starts with BOS when the tokenizer has one.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import sysconfig
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import torch

from circuitkit import CircuitkitError

TEXT_SUFFIXES = (".txt", ".jsonl")
EOT = "<|endoftext|>"  # end of text; also BOS and padding for the tokenizers trained here

# ---------------------------------------------------------------- the standard-library corpus

STDLIB = "stdlib"
# Folders left out wherever they sit: test suites and their data, demos, the IDE, generated
# tables (pydoc topics, codec maps), bundled wheels, third-party packages and caches.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "pydoc_data",
                           "encodings", "ensurepip", "__phello__", "site-packages", "dist-packages",
                           "__pycache__"})
EXCLUDED_PREFIXES = ("test_", "config-")  # test modules; the build's config-3.x-<platform> folder
MAX_FILE_BYTES = 1_000_000  # larger .py files are data, not code written by hand
# the two parts of a batch with repeated stretches (TextCorpus.row_parts): plain windows and repeat windows
ROW_PARTS = ("plain", "repeat")


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def select_python_files(root: str | Path) -> list[Path]:
    """The ``.py`` files under ``root`` that the code corpus keeps, sorted by relative path.

    Left out: any file below a folder named in :data:`EXCLUDED_DIRS`, folders and files whose
    name starts with one of :data:`EXCLUDED_PREFIXES`, files over :data:`MAX_FILE_BYTES`, and
    files that are not UTF-8 (a handful of test fixtures are Latin-1).
    """
    root = Path(root)
    if not root.is_dir():
        raise CircuitkitError(f"code corpus root {root} is not a folder; give stdlib (this interpreter's standard "
                              "library) or stdlib:FOLDER with a folder of .py files")
    kept = []
    for path in sorted(root.rglob("*.py"), key=lambda q: q.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith(EXCLUDED_PREFIXES) for part in rel.parts):
            continue
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        kept.append(path)
    if not kept:
        raise CircuitkitError(f"{root} holds no .py files the corpus rule keeps (see circuitkit.corpus.EXCLUDED_DIRS)")
    return kept


@dataclass(frozen=True)
class CorpusFile:
    path: str  # relative to the corpus root, with forward slashes
    sha256: str
    bytes: int
    split: str  # "train" or "heldout"


@dataclass(frozen=True)
class FileCorpus:
    """A code corpus split by file, with the manifest that identifies it.

    ``files`` holds every kept file in path order; the held-out files are
    ``round(heldout_fraction * n)`` of them (at least one) drawn with ``random.Random(seed)``.
    The corpus hash is the sha256 of the lines ``path<TAB>sha256<TAB>split``: equal hashes mean
    the same files with the same contents and the same split.
    """

    root: Path
    files: tuple[CorpusFile, ...]
    seed: int = 0
    heldout_fraction: float = 0.05

    @classmethod
    def build(cls, root: str | Path, seed: int = 0, heldout_fraction: float = 0.05) -> "FileCorpus":
        if not 0.0 < heldout_fraction < 1.0:
            raise CircuitkitError(f"the held-out fraction must be in (0, 1), got {heldout_fraction}")
        root = Path(root)
        paths = select_python_files(root)
        if len(paths) < 2:
            raise CircuitkitError(f"{root} yields {len(paths)} .py file(s); a corpus split by file needs at least 2")
        n_held = min(len(paths) - 1, max(1, round(heldout_fraction * len(paths))))
        held = set(random.Random(seed).sample(range(len(paths)), n_held))
        files = []
        for i, path in enumerate(paths):
            data = path.read_bytes()
            files.append(CorpusFile(path=path.relative_to(root).as_posix(), sha256=hashlib.sha256(data).hexdigest(),
                                    bytes=len(data), split="heldout" if i in held else "train"))
        return cls(root=root, files=tuple(files), seed=seed, heldout_fraction=heldout_fraction)

    @property
    def hash(self) -> str:
        lines = "".join(f"{f.path}\t{f.sha256}\t{f.split}\n" for f in self.files)
        return hashlib.sha256(lines.encode()).hexdigest()

    def paths(self, split: str) -> list[str]:
        if split not in ("train", "heldout"):
            raise CircuitkitError(f"split must be 'train' or 'heldout', got {split!r}")
        return [f.path for f in self.files if f.split == split]

    def texts(self, split: str) -> list[str]:
        """The documents of one split, in path order; a file changed since the build is an error."""
        out = []
        for f in self.files:
            if f.split != split:
                continue
            data = (self.root / f.path).read_bytes()
            if hashlib.sha256(data).hexdigest() != f.sha256:
                raise CircuitkitError(f"{self.root / f.path} changed after the corpus was built; rebuild it")
            out.append(data.decode("utf-8"))
        return out

    def manifest(self) -> dict[str, Any]:
        """Everything needed to tell whether two machines built the same corpus."""
        return {"rule": {"excluded_dirs": sorted(EXCLUDED_DIRS), "excluded_prefixes": list(EXCLUDED_PREFIXES),
                         "max_file_bytes": MAX_FILE_BYTES, "suffix": ".py", "utf8_only": True},
                "root": str(self.root), "python": sys.version.split()[0], "seed": self.seed,
                "heldout_fraction": self.heldout_fraction, "n_files": len(self.files),
                "n_heldout": len(self.paths("heldout")), "bytes": sum(f.bytes for f in self.files),
                "hash": self.hash, "files": [vars(f) for f in self.files]}


def code_corpus(source: str, seed: int = 0, heldout_fraction: float = 0.05) -> FileCorpus:
    """``stdlib`` (this interpreter's standard library) or ``stdlib:FOLDER`` as a :class:`FileCorpus`."""
    if source == STDLIB:
        return FileCorpus.build(stdlib_root(), seed=seed, heldout_fraction=heldout_fraction)
    if source.startswith(STDLIB + ":"):
        return FileCorpus.build(source[len(STDLIB) + 1:], seed=seed, heldout_fraction=heldout_fraction)
    raise CircuitkitError(f"{source!r} is not a code corpus; write stdlib or stdlib:FOLDER")


def is_code_corpus(source: str | None) -> bool:
    return bool(source) and (source == STDLIB or source.startswith(STDLIB + ":"))


# ---------------------------------------------------------------- the tokenizer

def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on ``texts`` (Hugging Face ``tokenizers``).

    One special token, :data:`EOT`, id 0, used as end of text, BOS and padding. Returns a
    ``transformers.PreTrainedTokenizerFast``; save it with ``save_pretrained`` (writes
    ``tokenizer.json``). Training is deterministic for the same texts and size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise CircuitkitError(f"tokenizer_vocab must be at least 300 (256 bytes, {EOT} and some merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok):
    """A ``tokenizers.Tokenizer`` as the ``PreTrainedTokenizerFast`` TransformerLens expects."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   unk_token=None, add_bos_token=True, clean_up_tokenization_spaces=False)
    # TransformerLens's set_tokenizer re-reads a tokenizer from its name_or_path unless it already adds
    # BOS; this one does (``add_bos_token``), and an in-memory tokenizer has no path to re-read.
    fast.init_kwargs.setdefault("name_or_path", "")
    return fast


def bigram_ce(train: torch.Tensor,  # [n_train] token ids
              heldout: torch.Tensor,  # [n_heldout] token ids
              d_vocab: int) -> dict[str, float]:
    """Held-out next-token CE (nats) of an interpolated bigram model counted on ``train``.

    p(b | a) = λ·c(a, b)/c(a) + (1 − λ)·p_uni(b), with add-one unigram counts; λ is picked on
    ``heldout`` itself from a grid, which favours the baseline (a model is compared against the
    best bigram model of this family). Returns ``{"ce", "lambda", "unigram_ce"}``.
    """
    train, heldout = train.long().flatten(), heldout.long().flatten()
    uni = torch.bincount(train, minlength=d_vocab).double() + 1.0
    p_uni = uni / uni.sum()
    pair = torch.bincount(train[:-1] * d_vocab + train[1:], minlength=d_vocab * d_vocab).view(d_vocab, d_vocab)
    row = pair.sum(-1).double()
    a, b = heldout[:-1], heldout[1:]
    c_ab = pair[a, b].double()
    c_a = row[a]
    p_big = torch.where(c_a > 0, c_ab / c_a.clamp(min=1), torch.zeros_like(c_ab))
    best = None
    for lam in (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99):
        ce = -(lam * p_big + (1 - lam) * p_uni[b]).log().mean().item()
        if best is None or ce < best[0]:
            best = (ce, lam)
    return {"ce": best[0], "lambda": best[1], "unigram_ce": -p_uni[b].log().mean().item()}


# ---------------------------------------------------------------- documents


def read_documents(source: str, text_field: str = "text", split: str = "train") -> list[str]:
    """The documents of a corpus source (see the module docstring)."""
    if source.startswith("hf:"):
        return _hf_documents(source[3:], text_field, split)
    path = Path(source)
    if not path.exists():
        raise CircuitkitError(f"corpus {source!r} does not exist; give a .txt/.jsonl file, a folder of them, or "
                              "a Hugging Face dataset as hf:NAME[:CONFIG]")
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise CircuitkitError(f"corpus folder {path} holds no .txt or .jsonl files")
    docs: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            docs += list(_jsonl_documents(f, text_field))
        elif f.suffix == ".txt":
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
        else:
            raise CircuitkitError(f"corpus file {f} must end in .txt or .jsonl")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CircuitkitError(f"corpus {source!r} contains no text")
    return docs


def _jsonl_documents(path: Path, text_field: str) -> Iterable[str]:
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CircuitkitError(f"{path}:{n} is not valid JSON ({e})") from None
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict) and isinstance(obj.get(text_field), str):
            yield obj[text_field]
        else:
            raise CircuitkitError(f"{path}:{n}: each line must be a JSON string or an object with a string "
                                  f"{text_field!r} field")


def _hf_documents(spec: str, text_field: str, split: str) -> list[str]:
    name, _, config = spec.partition(":")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise CircuitkitError("a Hugging Face corpus needs the `datasets` package (pip install datasets); "
                              "or pass local .txt/.jsonl files") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # offline, unknown name, ...: one clear message
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise CircuitkitError(f"could not load Hugging Face dataset {spec!r} (split {split!r}): {msg}. Without "
                              "network access, put it in the local cache (HF_HOME) with HF_DATASETS_OFFLINE=1, "
                              "or pass local .txt/.jsonl files") from None
    if text_field not in ds.column_names:
        raise CircuitkitError(f"dataset {spec!r} has no {text_field!r} column (columns: {ds.column_names})")
    return [t for t in ds[text_field] if isinstance(t, str) and t.strip()]


def chunk_tokens(ids: list[int] | torch.Tensor, seq_len: int, bos_id: int | None = None) -> torch.Tensor:
    """Cut a token stream into ``[n, seq_len]`` rows, dropping the incomplete tail.

    With ``bos_id`` each row starts with it and holds ``seq_len − 1`` stream tokens.
    """
    if seq_len < 2:
        raise CircuitkitError(f"seq_len must be at least 2, got {seq_len}")
    ids = torch.as_tensor(ids, dtype=torch.long)
    body = seq_len - 1 if bos_id is not None else seq_len
    n = ids.numel() // body
    if n == 0:
        raise CircuitkitError(f"the corpus has {ids.numel()} tokens, fewer than one sequence of {body}")
    rows = ids[: n * body].view(n, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows


def tokenize_stream(docs: Iterable[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The documents tokenised and joined, each followed by the end-of-text token. -> [n_tokens]"""
    eos = tokenizer.eos_token_id
    parts: list[list[int]] = []
    n = 0
    for ids in _encode_all(list(docs), tokenizer):
        parts.append(ids + ([eos] if eos is not None else []))
        n += len(parts[-1])
        if max_tokens is not None and n >= max_tokens:
            break
    stream = torch.tensor([t for part in parts for t in part], dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


def _encode_all(docs: list[str], tokenizer) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: encode in one batched call (Rust, parallel)
        return [e.ids for e in backend.encode_batch(docs, add_special_tokens=False)]
    return [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]


@dataclass
class TextCorpus:
    """Token sequences for training and held-out evaluation of a language model.

    ``train`` and ``heldout`` are fixed ``[n, seq_len]`` rows. A code corpus also keeps its
    whole train stream, and :meth:`sample` then draws windows at random offsets of it (more
    distinct windows than fixed rows); ``manifest`` identifies the files it came from.
    """

    train: torch.Tensor  # [n_train, seq_len]
    heldout: torch.Tensor  # [n_heldout, seq_len]
    source: str = ""
    train_stream: torch.Tensor | None = None  # [n_tokens], code corpora only
    bos_id: int | None = None
    manifest: dict[str, Any] | None = field(default=None, repr=False)
    repeat_fraction: float = 0.0  # of each training batch: windows that repeat a stretch of the stream
    repeat_min: int = 8  # the shortest repeated stretch (tokens)

    def __post_init__(self) -> None:
        if not 0.0 <= self.repeat_fraction <= 1.0:
            raise CircuitkitError(f"corpus_repeat_fraction must be in [0, 1], got {self.repeat_fraction}")
        if self.repeat_fraction > 0:
            body = self.seq_len - (self.bos_id is not None)
            if self.train_stream is None:
                raise CircuitkitError("corpus_repeat_fraction needs a corpus kept as one stream (a code corpus, "
                                      "stdlib[:FOLDER]); other text is cut into fixed rows")
            if not 1 <= self.repeat_min <= body // 2:
                raise CircuitkitError(f"corpus_repeat_min must be between 1 and half a window ({body // 2} tokens at "
                                      f"corpus_seq_len {self.seq_len}), got {self.repeat_min}; a window must hold "
                                      "the stretch twice")

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    @classmethod
    def from_source(cls, source: str, tokenizer, seq_len: int = 128, heldout_fraction: float = 0.05,
                    text_field: str = "text", max_tokens: int | None = None, prepend_bos: bool = True,
                    split: str = "train", seed: int = 0) -> "TextCorpus":
        if not 0.0 < heldout_fraction < 1.0:
            raise CircuitkitError(f"corpus_heldout_fraction must be in (0, 1), got {heldout_fraction}")
        files = code_corpus(source, seed=seed, heldout_fraction=heldout_fraction) if is_code_corpus(source) else None
        docs = read_documents(source, text_field=text_field, split=split) if files is None else []
        if tokenizer is None:
            raise CircuitkitError("a text corpus needs a model with a tokenizer (a pretrained LM such as gpt2, or a "
                                  "language model trained here with its tokenizer.json); toy models train on tasks "
                                  "(--task / --tasks)")
        bos = tokenizer.bos_token_id if prepend_bos else None
        if files is not None:
            return cls.from_files(files, tokenizer, seq_len=seq_len, max_tokens=max_tokens, bos_id=bos, source=source)
        rows = chunk_tokens(tokenize_stream(docs, tokenizer, max_tokens), seq_len, bos)
        if rows.shape[0] < 2:
            raise CircuitkitError(f"corpus {source!r} yields {rows.shape[0]} sequence(s) of {seq_len} tokens; "
                                  "need at least 2 (one to train on, one held out): add text or lower seq_len")
        n_held = min(rows.shape[0] - 1, max(1, round(heldout_fraction * rows.shape[0])))
        return cls(train=rows[:-n_held], heldout=rows[-n_held:], source=source, bos_id=bos)

    @classmethod
    def from_files(cls, corpus: FileCorpus, tokenizer, seq_len: int = 128, max_tokens: int | None = None,
                   bos_id: int | None = None, source: str = "") -> "TextCorpus":
        """Train rows from the train files, held-out rows from the held-out files (never mixed)."""
        train = tokenize_stream(corpus.texts("train"), tokenizer, max_tokens)
        held = tokenize_stream(corpus.texts("heldout"), tokenizer)
        body = seq_len - (bos_id is not None)
        for what, stream in (("train", train), ("held-out", held)):
            if stream.numel() <= body:
                raise CircuitkitError(f"the {what} files of {source or corpus.root} hold {stream.numel()} tokens, "
                                      f"fewer than one window of {seq_len}; add files or lower seq_len")
        return cls(train=chunk_tokens(train, seq_len, bos_id), heldout=chunk_tokens(held, seq_len, bos_id),
                   source=source, train_stream=train, bos_id=bos_id, manifest=corpus.manifest())

    def with_repeats(self, fraction: float, min_period: int = 8) -> "TextCorpus":
        """This corpus with ``fraction`` of each training batch drawn as repeated stretches (:meth:`sample`)."""
        return replace(self, repeat_fraction=float(fraction), repeat_min=int(min_period))

    def rows(self, split: str, n: int | None = None) -> torch.Tensor:  # [min(n, rows), seq_len]
        """``n`` rows of ``split`` ("train" or "heldout") spread evenly over it (all rows when ``n`` is
        None or at least their number): the first rows would all come from the first files."""
        if split not in ("train", "heldout"):
            raise CircuitkitError(f"split must be 'train' or 'heldout', got {split!r}")
        t = self.train if split == "train" else self.heldout
        if n is None or n >= t.shape[0]:
            return t
        return t[torch.linspace(0, t.shape[0] - 1, n).round().long()]

    def n_repeat(self, n: int) -> int:
        """How many of ``n`` training rows are repeat windows: the first ``round(repeat_fraction · n)``."""
        return round(self.repeat_fraction * n)

    def row_parts(self, n: int) -> torch.Tensor:  # -> [n] long: 0 plain window, 1 repeat window (ROW_PARTS)
        """The part each of ``n`` rows of :meth:`sample` (or :meth:`constraint_rows`) belongs to."""
        parts = torch.zeros(n, dtype=torch.long)
        parts[:min(self.n_repeat(n), n)] = 1
        return parts

    def constraint_rows(self, n: int, seed: int = 12345) -> torch.Tensor:  # [n, seq_len]
        """Rows of the training distribution, fixed: ``n`` train rows spread evenly over the train split,
        the first ``round(repeat_fraction · n)`` of them replaced by repeat windows drawn with ``seed``."""
        rows = self.rows("train", n).clone()
        n_rep = min(self.n_repeat(n), rows.shape[0])
        if n_rep:
            body_start = int(self.bos_id is not None)
            rows[:n_rep, body_start:] = self.repeat_windows(n_rep, torch.Generator().manual_seed(seed))
        return rows

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training sequences [n, seq_len] and their loss mask (every position).

        Fixed rows drawn with replacement; for a code corpus, windows at uniformly random
        offsets of the train stream (after BOS when the corpus has one). With ``repeat_fraction``
        the first ``round(repeat_fraction · n)`` windows instead hold one stretch of the stream
        written again and again: a period ``p`` drawn uniformly from ``[repeat_min, body // 2]``,
        token ``i`` of the body is ``stream[start + i mod p]`` (:meth:`repeat_windows`). Real code,
        repeated: the data from which a model learns to copy what came before (induction).
        """
        if self.train_stream is None:
            idx = torch.randint(self.train.shape[0], (n,), generator=generator)
            tokens = self.train[idx]
        else:
            body = self.seq_len - (self.bos_id is not None)
            start = torch.randint(self.train_stream.numel() - body + 1, (n,), generator=generator)
            tokens = self.train_stream[start[:, None] + torch.arange(body)]  # [n, body]
            n_rep = self.n_repeat(n)
            if n_rep:  # drawn only then, so a run without repeats draws what it always drew
                tokens[:n_rep] = self.repeat_windows(n_rep, generator)
            if self.bos_id is not None:
                tokens = torch.cat([torch.full((n, 1), self.bos_id, dtype=torch.long), tokens], dim=1)
        return tokens, torch.ones_like(tokens, dtype=torch.bool)

    def repeat_windows(self, n: int, generator: torch.Generator) -> torch.Tensor:  # -> [n, body]
        """``n`` window bodies, each a stretch of the train stream repeated with a random period."""
        body = self.seq_len - (self.bos_id is not None)
        period = torch.randint(self.repeat_min, body // 2 + 1, (n,), generator=generator)  # [n]
        start = torch.randint(self.train_stream.numel() - body // 2 + 1, (n,), generator=generator)  # [n]
        return self.train_stream[start[:, None] + torch.arange(body)[None] % period[:, None]]
