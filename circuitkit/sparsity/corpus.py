"""Text corpora for sparse post-training of pretrained language models (e.g. gpt2).

A corpus is local ``.txt`` files (one document each), ``.jsonl`` files (one document per
line: a JSON string or an object with a ``text`` field), a folder of those, or a Hugging
Face dataset written ``hf:NAME`` or ``hf:NAME:CONFIG`` (needs the ``datasets`` package and
either network access or a local cache). Documents are tokenised with the model's
tokenizer, joined with the end-of-text token, and cut into fixed-length sequences; the
last ``heldout_fraction`` of the sequences are held out (for the base CE and the target).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from circuitkit import CircuitkitError
from circuitkit.training import masked_ce

TEXT_SUFFIXES = (".txt", ".jsonl")


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


@dataclass
class TextCorpus:
    """Fixed-length token sequences, split into training and held-out rows."""

    train: torch.Tensor  # [n_train, seq_len]
    heldout: torch.Tensor  # [n_heldout, seq_len]
    source: str = ""

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    @classmethod
    def from_source(cls, source: str, tokenizer, seq_len: int = 128, heldout_fraction: float = 0.05,
                    text_field: str = "text", max_tokens: int | None = None, prepend_bos: bool = True,
                    split: str = "train") -> "TextCorpus":
        if not 0.0 < heldout_fraction < 1.0:
            raise CircuitkitError(f"corpus_heldout_fraction must be in (0, 1), got {heldout_fraction}")
        docs = read_documents(source, text_field=text_field, split=split)
        if tokenizer is None:
            raise CircuitkitError("a text corpus needs a model with a tokenizer (a pretrained LM such as gpt2); "
                                  "toy models train on tasks (--task / --tasks)")
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for d in docs:
            stream += tokenizer(d, add_special_tokens=False)["input_ids"]
            if eos is not None:
                stream.append(eos)
            if max_tokens is not None and len(stream) >= max_tokens:
                stream = stream[:max_tokens]
                break
        bos = tokenizer.bos_token_id if prepend_bos else None
        rows = chunk_tokens(stream, seq_len, bos)
        if rows.shape[0] < 2:
            raise CircuitkitError(f"corpus {source!r} yields {rows.shape[0]} sequence(s) of {seq_len} tokens; "
                                  "need at least 2 (one to train on, one held out): add text or lower seq_len")
        n_held = min(rows.shape[0] - 1, max(1, round(heldout_fraction * rows.shape[0])))
        return cls(train=rows[:-n_held], heldout=rows[-n_held:], source=source)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training rows drawn with replacement; the loss mask covers every position."""
        idx = torch.randint(self.train.shape[0], (n,), generator=generator)
        tokens = self.train[idx]
        return tokens, torch.ones_like(tokens, dtype=torch.bool)

    @torch.no_grad()
    def heldout_ce(self, model, n: int | None = None, batch_size: int = 16) -> float:
        """Mean next-token CE over the held-out rows (the first ``n`` of them)."""
        rows = self.heldout if n is None else self.heldout[:n]
        was = model.training
        model.eval()
        total, count = 0.0, 0
        for i in range(0, rows.shape[0], batch_size):
            b = rows[i:i + batch_size].to(model.cfg.device)
            mask = torch.ones_like(b, dtype=torch.bool)
            k = b.shape[0] * (b.shape[1] - 1)
            total += masked_ce(model(b), b, mask).item() * k
            count += k
        model.train(was)
        return total / count
