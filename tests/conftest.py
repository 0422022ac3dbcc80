"""Shared fixtures; makes the whole test session offline against a local Hugging Face cache.

``huggingface_hub`` (and through it ``transformers`` and ``transformer_lens``) reads
``HF_HOME`` / ``HF_HUB_OFFLINE`` into constants when it is first imported, so the
environment is set here, at the top of the first conftest, before any test module
imports them. The cache itself (a small random GPT-2 and a locally trained tokenizer,
see ``tests/gpt2_offline.py``) is built on first use of the ``offline_gpt2`` fixture and
removed when the session ends. No test ever reaches the network.

Fixtures for everyone:

- ``offline_gpt2`` (session): ``circuitkit.models.load_model("gpt2")`` loaded through
  TransformerLens's real ``from_pretrained`` from that cache: 2 layers, d_model 64, 4 heads,
  n_ctx 64, a byte-level BPE vocabulary of a few hundred tokens. Shared by all tests:
  do not modify it (no training, no gates); take ``fresh_offline_gpt2`` for that.
- ``fresh_offline_gpt2`` (function): a new, private copy of the same model (about 0.2 s).
- ``offline_gpt2_corpus`` (session): text lines the tokenizer was trained on (the NL task
  templates), usable as a tiny training corpus.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

_TESTS = Path(__file__).parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

import gpt2_offline  # noqa: E402  (a plain helper module beside this file)

_HF_HOME = Path(tempfile.mkdtemp(prefix="circuitkit-hf-"))
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
_HUB_MODULES_ALREADY_IMPORTED = sorted(m for m in ("huggingface_hub", "transformers", "transformer_lens")
                                       if m in sys.modules)
os.environ.update(gpt2_offline.offline_env(_HF_HOME))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread, and it is kinder to a shared 2-core machine.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_offline_cache_in_use() -> None:
    import huggingface_hub.constants as hub_constants

    if Path(hub_constants.HF_HUB_CACHE).resolve() != (_HF_HOME / "hub").resolve() or not hub_constants.HF_HUB_OFFLINE:
        raise RuntimeError(
            f"{', '.join(_HUB_MODULES_ALREADY_IMPORTED) or 'huggingface_hub'} was imported before tests/conftest.py "
            f"set HF_HOME, so the hub reads {hub_constants.HF_HUB_CACHE} instead of the offline test cache "
            f"{_HF_HOME / 'hub'}; run pytest without plugins that import transformers early, or export "
            f"HF_HOME={_HF_HOME} HF_HUB_OFFLINE=1 before starting it")


@pytest.fixture(scope="session")
def offline_gpt2_cache() -> Path:
    """The ``HF_HOME`` folder holding the offline GPT-2 (built once per session)."""
    gpt2_offline.build_cache(_HF_HOME)
    _check_offline_cache_in_use()
    return _HF_HOME


@pytest.fixture(scope="session")
def offline_gpt2(offline_gpt2_cache):
    """``load_model("gpt2")`` from the offline cache; shared by the session, treat as read-only."""
    from circuitkit.models import load_model

    return load_model("gpt2")


@pytest.fixture
def fresh_offline_gpt2(offline_gpt2_cache):
    """A private copy of the offline GPT-2 that a test may train or modify."""
    from circuitkit.models import load_model

    return load_model("gpt2")


@pytest.fixture(scope="session")
def offline_gpt2_corpus() -> list[str]:
    return gpt2_offline.corpus_lines()


def _zoo_state() -> dict[str, tuple[int, int]]:
    zoo = Path(__file__).resolve().parent.parent / "circuitkit" / "zoo"
    return {str(p.relative_to(zoo)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(zoo.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def shipped_zoo_untouched():
    """No test may write into the shipped zoo (a test that trains with the zoo configs' real
    ``train`` would replace the shipped models): the session fails if any file there changed."""
    before = _zoo_state()
    yield
    after = _zoo_state()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the test session wrote into circuitkit/zoo: {changed}"
