"""Files in and out: atomic writes, strict JSON, TOML configs and the one check of their fields.

Why one module: every checkpoint, card, circuit and table circuitkit writes goes through
:func:`atomic_path` (written to a temporary file in the same folder, flushed, renamed over the
target with ``os.replace``, which is atomic on POSIX and Windows), so an interrupted run never
leaves a half-written file; the file gets the mode the umask gives any new file (``mkstemp``
alone would leave it 0600). JSON is written strictly (no bare ``NaN``, which is not JSON) and
read with errors that name the file. Config dataclasses mix in :class:`TomlConfig`, whose
:func:`check_fields` checks every field against its declared type and the class's ``RANGES``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import torch

from circuitkit import CircuitkitError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The file ends with mode ``0o666 & ~umask``, as if it had been created by ``open``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor | None]], *context: str) -> str:
    """16 hex digits of sha256 over ``context`` strings, then each named tensor's name, dtype, shape and bytes (a None
    tensor is hashed as absent): the fingerprint of a dataset or a model's weights, equal only for equal values."""
    h = hashlib.sha256()
    for c in context:
        h.update(c.encode())
    for name, t in tensors:
        if t is None:
            h.update(f"{name}:none".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as JSON; a NaN or infinity anywhere in it is an error (it is not JSON)."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    except ValueError:
        where = _non_finite_at(obj)
        raise CircuitkitError(f"refusing to write {path}: {where or 'a value'} is not a finite number "
                              "(NaN/Infinity are not JSON); the computation that produced it went wrong") from None
    write_text(path, text + "\n")


def _non_finite_at(obj: Any, at: str = "") -> str | None:
    """The key path of the first non-finite number inside ``obj`` (``None`` if there is none)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.tolist()
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (at or "the value")
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _non_finite_at(v, f"{at}[{k!r}]" if isinstance(k, str) else f"{at}[{k}]")
        if found:
            return found
    return None


def read_json(path: str | os.PathLike) -> Any:
    """Parse the JSON file at ``path``; a missing, unreadable or malformed file is a clear error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CircuitkitError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CircuitkitError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise CircuitkitError(f"{path} is not valid JSON ({e}); the file is damaged: restore or rewrite it") from None


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
    """A TOML config as a dict, with clear errors for a missing, unreadable or non-text file and bad syntax."""
    import tomllib

    path = Path(path)
    if not path.exists():
        raise CircuitkitError(f"config file {path} does not exist")
    if path.is_dir():
        raise CircuitkitError(f"config {path} is a folder; give the TOML file inside it")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CircuitkitError(f"config {path} is not a text file (not UTF-8); give a TOML file") from None
    except OSError as e:
        raise CircuitkitError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CircuitkitError(f"{path} is not valid TOML: {e}") from None


# ---------------------------------------------------------------- config fields

@dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric config field (``None``: unbounded on that side)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo < x rather than lo <= x
    hi_open: bool = False
    name: str | None = None  # how messages say it ("positive")

    def contains(self, x: float) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return not (self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi))

    def describe(self) -> str:
        if self.name:
            return self.name
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, lo_open=True, name="positive")
NON_NEGATIVE = Range(0, name=">= 0")
FRACTION = Range(0, 1)  # [0, 1]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    if origin in (dict, Mapping):
        return f"a table whose values are {_type_name(typing.get_args(tp)[1])}" if typing.get_args(tp) else "a table"
    if origin in (list, tuple):
        return f"a list whose items are {_type_name(typing.get_args(tp)[0])}" if typing.get_args(tp) else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Any: "anything"}.get(tp, getattr(tp, "__name__", str(tp)))


def _conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the declared type ``tp`` (as TOML gives it: lists for tuples)."""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            return False
        kt, vt = args if args else (Any, Any)
        return all(_conforms(k, kt) and _conforms(v, vt) for k, v in value.items())
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        et = args[0] if args else Any
        return all(_conforms(v, et) for v in value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def check_fields(cls: type, values: Mapping[str, Any], source: str = "config") -> None:
    """Check each of ``values`` against the type its field of the dataclass ``cls`` declares and
    against ``cls.RANGES`` (field name -> :class:`Range`); raise a :class:`CircuitkitError` naming
    the first field that is wrong, its value and what it must be."""
    hints = typing.get_type_hints(cls)
    ranges: Mapping[str, Range] = getattr(cls, "RANGES", {})
    for f in fields(cls):
        if f.name not in values:
            continue
        v, tp = values[f.name], hints[f.name]
        if not _conforms(v, tp):
            raise CircuitkitError(f"{source}: {f.name} must be {_type_name(tp)}, got {v!r}")
        r = ranges.get(f.name)
        if r is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and not r.contains(v):
            raise CircuitkitError(f"{source}: {f.name} must be {r.describe()}, got {v!r}")


def check_keys(raw: Mapping[str, Any], known: set[str], required: set[str] = frozenset(),
               source: str = "config") -> None:
    """Raise a clear error for unknown or missing keys of a config table."""
    if not isinstance(raw, Mapping):
        raise CircuitkitError(f"{source}: expected a table of settings, got {raw!r}")
    unknown = set(raw) - set(known)
    if unknown:
        raise CircuitkitError(f"{source}: unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
    missing = set(required) - set(raw)
    if missing:
        raise CircuitkitError(f"{source}: missing required keys {sorted(missing)}")


class TomlConfig:
    """Mixin for a frozen config dataclass: every field is checked against its declared type and
    ``RANGES`` on construction (:func:`check_fields`); ``from_dict`` checks the keys (``REQUIRED``
    must be present), turns TOML lists into the tuples the class declares, and names ``source``
    in every error; ``from_toml`` reads the file and lays the command line's overrides (those not
    None) over it. A subclass checks what spans several fields in ``check``."""

    RANGES: ClassVar[Mapping[str, Range]] = {}
    REQUIRED: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        check_fields(type(self), {f.name: getattr(self, f.name) for f in fields(self)}, type(self).__name__)
        self.check(type(self).__name__)

    def check(self, source: str) -> None:
        """Checks across fields (a subclass overrides this); raise CircuitkitError naming ``source``."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config"):
        check_keys(raw, {f.name for f in fields(cls)}, cls.REQUIRED, source)
        check_fields(cls, raw, source)
        hints = typing.get_type_hints(cls)
        kw = {k: tuple(v) if typing.get_origin(hints[k]) is tuple and isinstance(v, list) else v
              for k, v in raw.items()}
        try:
            return cls(**kw)
        except CircuitkitError as e:  # a check across fields: say which file it came from
            msg = str(e)
            prefix = f"{cls.__name__}: "
            raise CircuitkitError(f"{source}: {msg[len(prefix):] if msg.startswith(prefix) else msg}") from None

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides: Any):
        raw = read_toml(path)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw, source=str(path))



def check_writable_dir(path: str | os.PathLike, what: str = "the output folder") -> Path:
    """Fail early, before any computation, unless ``path`` is a folder this process can write
    into or a folder that can be made there (its nearest existing parent is a writable folder)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CircuitkitError(f"{what} {path} is an existing file, not a folder; give a folder path")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise CircuitkitError(f"{what} {path} cannot be made: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CircuitkitError(f"{what} {path} cannot be written: no write permission in {probe}")
    return path
