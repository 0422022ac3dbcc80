"""Atomic file writes, so an interrupted run never leaves a half-written checkpoint.

Every checkpoint, card, circuit and table that circuitkit writes goes through here: the
data is written to a temporary file in the same folder, flushed, and renamed over the
target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML config as a dict, with clear errors for a missing file or bad syntax."""
    import tomllib

    from circuitkit import CircuitkitError

    path = Path(path)
    if not path.exists():
        raise CircuitkitError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CircuitkitError(f"{path} is not valid TOML: {e}") from None


class TomlConfig:
    """Mixin for a frozen config dataclass read from TOML: ``from_toml`` reads the file, lays the
    command line's overrides (those not None) over it and hands the dict to the class's ``from_dict``."""

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides: Any):
        raw = read_toml(path)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw, source=str(path))


def check_keys(raw: dict[str, Any], known: set[str], required: set[str] = frozenset(),
               source: str = "config") -> None:
    """Raise a clear error for unknown or missing keys of a config table."""
    from circuitkit import CircuitkitError

    unknown = set(raw) - set(known)
    if unknown:
        raise CircuitkitError(f"{source}: unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
    missing = set(required) - set(raw)
    if missing:
        raise CircuitkitError(f"{source}: missing required keys {sorted(missing)}")
