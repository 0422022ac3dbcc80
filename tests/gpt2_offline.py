"""An offline stand-in for the Hugging Face ``gpt2`` checkpoint, for tests with no network.

``build_cache(hf_home)`` writes a Hugging Face cache under ``hf_home`` that holds a small,
randomly initialised GPT-2 (``GPT2LMHeadModel`` written by ``save_pretrained``) and a
byte-level BPE tokenizer trained here on :func:`corpus_lines`, laid out exactly as a
download of ``openai-community/gpt2`` would be::

    hub/models--openai-community--gpt2/refs/main                      (the snapshot id)
    hub/models--openai-community--gpt2/snapshots/<id>/config.json, model.safetensors, ...
    hub/models--gpt2 -> models--openai-community--gpt2                (see below)

TransformerLens 3.9 asks the hub for the repo id ``gpt2`` (its official name), and
``huggingface_hub`` caches a repo id under ``models--<id>``, so an offline lookup reads
``hub/models--gpt2``; online the hub redirects ``gpt2`` to ``openai-community/gpt2``. The
cache therefore holds the model under the canonical name and ``models--gpt2`` as a link to
it (a copy where links are not allowed), so both names resolve offline.

With ``HF_HOME=hf_home`` and ``HF_HUB_OFFLINE=1`` set *before* ``huggingface_hub`` /
``transformers`` / ``transformer_lens`` are imported (they read those variables into
constants at import time), ``circuitkit.models.load_model("gpt2")`` goes through
TransformerLens's real ``HookedTransformer.from_pretrained("gpt2")`` and loads it.
``tests/conftest.py`` does that and exposes the loaded model as the ``offline_gpt2``
fixture.

The tokenizer corpus contains the natural-language task templates, names, years and
argument names (:mod:`circuitkit.tasks.nl`), so all of them come out as single tokens, as
they do for the real GPT-2; years are split " 17" + "YY" like GPT-2 does.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

REPO_FOLDER = "models--openai-community--gpt2"
ALIAS_FOLDER = "models--gpt2"  # the repo id TransformerLens requests
SNAPSHOT_ID = "c1e4a7d0be5f0e6d2b1f3a9c8d7e6f5a4b3c2d1e"  # any 40-hex id; refs/main points at it
EOT = "<|endoftext|>"
# Small on purpose: loads in about a second. n_ctx must be given (transformers 5 no longer sets it).
GPT2_CONFIG = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, n_ctx=64, n_inner=None,
                   activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
MAX_VOCAB = 2000
SEED = 0


def corpus_lines(n_per_template: int = 40, seed: int = SEED) -> list[str]:
    """Plain text made of the NL task templates (also usable as a tiny training corpus).

    Years never appear as four digits: " 17" and the two-digit "YY" tokens are learned
    separately, so the trained BPE writes "1732" as " 17" + "32" (as GPT-2 does).
    """
    from circuitkit.tasks import nl

    rng = random.Random(seed)
    lines: list[str] = []
    for template in nl.IOI_TEMPLATES:
        for _ in range(n_per_template):
            io, s, other = rng.sample(nl.IOI_NAMES, 3)
            n1, n2 = rng.choice([(io, s), (s, io)])
            lines.append(template.format(N1=n1, N2=n2, S=s, PLACE=rng.choice(nl.IOI_PLACES),
                                         OBJECT=rng.choice(nl.IOI_OBJECTS)) + f" {io}.")
    for name in nl.IOI_NAMES:  # every name in every slot position at least a few times
        lines.append(f"When {name} and {name} met {name}, {name} said hello to {name}.")
    for _ in range(4 * n_per_template):
        noun = rng.choice(nl.GT_NOUNS)
        lines.append(f"The {noun} lasted from the year {nl.GT_CENTURY} to the year {nl.GT_CENTURY}.")
    years = [f"{y:02d}" for y in range(100)]
    for _ in range(6):
        rng.shuffle(years)
        lines.append("#" + "#".join(years))
    for _ in range(2 * n_per_template):
        a, b, c = rng.sample(nl.DOC_ARGS, 3)
        lines.append(nl.DOC_TEMPLATE.format(
            F=rng.choice(nl.DOC_FUNCS), A=a, B=b, C=c, SUMMARY=rng.choice(nl.DOC_SUMMARIES),
            **{f"D{k + 1}": rng.choice(nl.DOC_WORDS) for k in range(nl.N_DOC_WORDS)}) + f" {c}: the value\n")
    for arg in nl.DOC_ARGS:
        lines.append(f"def {arg}(self, {arg}, {arg}):\n    :param {arg}: {arg}\n")
    rng.shuffle(lines)
    return lines


def train_tokenizer(lines: list[str], max_vocab: int = MAX_VOCAB):
    """A GPT-2-style byte-level BPE (``tokenizers``), trained on ``lines``; ``<|endoftext|>`` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=max_vocab, min_frequency=1, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return tok


def build_cache(hf_home: str | Path) -> Path:
    """Write the fake ``openai-community/gpt2`` into ``hf_home``'s hub cache; returns the snapshot folder.

    Idempotent: an existing complete snapshot is reused.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    hub = Path(hf_home) / "hub"
    repo = hub / REPO_FOLDER
    snapshot = repo / "snapshots" / SNAPSHOT_ID
    done = [hub / r / "snapshots" / SNAPSHOT_ID / "model.safetensors" for r in (REPO_FOLDER, ALIAS_FOLDER)]
    if all(p.exists() for p in done) and (repo / "refs" / "main").exists():
        return snapshot
    snapshot.mkdir(parents=True, exist_ok=True)

    model_json = json.loads(train_tokenizer(corpus_lines()).to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tokenizer = GPT2Tokenizer(vocab=model_json["vocab"], merges=merges, unk_token=EOT, bos_token=EOT,
                              eos_token=EOT)
    tokenizer.model_max_length = GPT2_CONFIG["n_ctx"]
    tokenizer.save_pretrained(snapshot)

    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **GPT2_CONFIG)
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(SEED)
    GPT2LMHeadModel(config).save_pretrained(snapshot)

    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT_ID)
    alias = hub / ALIAS_FOLDER
    if not alias.exists():
        try:
            alias.symlink_to(REPO_FOLDER, target_is_directory=True)
        except OSError:  # no symlinks (e.g. Windows without developer mode): copy the few small files
            shutil.copytree(repo, alias)
    return snapshot


def offline_env(hf_home: str | Path) -> dict[str, str]:
    """The environment that makes the hub libraries read only ``hf_home``'s cache."""
    hf_home = str(hf_home)
    return {"HF_HOME": hf_home, "HF_HUB_CACHE": str(Path(hf_home) / "hub"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false"}
