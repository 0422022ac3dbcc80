"""The one module that constructs or loads a model.

Every ``HookedTransformer`` in circuitkit comes from here: toy models built from a named
configuration, checkpoints saved by circuitkit (safetensors weights + ``card.json``, and
``sparsity.json`` for a sparse model, whose gates :func:`circuitkit.sparsity.load_model`
attaches), the zoo shipped inside the package, and
TransformerLens pretrained names such as ``gpt2``. A move to ``TransformerBridge`` touches
this file only.

Supported: decoder-only transformers whose blocks read the residual stream directly, through
a pre-norm (LayerNorm or RMSNorm, with or without weights) or no normalisation at all, with an
MLP in every block (sequential or parallel to attention) or none (attention-only), and one key
and value input per head (GPT-2, Pythia, TransformerLens's ``attn-only-*`` models, the toy
zoo). :func:`check_supported` refuses the rest; ``docs/method.md`` §2 says why.

Loading a checkpoint is strict: the weights must be exactly those the card's config
describes (no missing, unexpected or differently sized tensors) and finite, and a damaged
``card.json`` or ``model.safetensors`` is an error that names the file, never a model that
runs with part of its weights or a traceback from inside safetensors.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitkit import CircuitkitError
from circuitkit.io import atomic_path, read_json, write_json
from circuitkit.tasks.vocab import TOY_VOCAB, VOCAB, is_toy  # noqa: F401  (is_toy: re-exported)

ZOO_DIR = Path(__file__).parent / "zoo"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
SPARSITY_FILE = "sparsity.json"
LOCAL_MODELS_DIR = "models"  # where the zoo configs write (out = "models/NAME"), relative to the working folder
TOKENIZER_FILE = "tokenizer.json"  # a tokenizer trained here (circuitkit.corpus), saved beside the weights

# Named toy architectures. All are pre-LN GPT-style with learned positions.
TOY_CONFIGS: dict[str, dict[str, Any]] = {
    "toy-4l": dict(n_layers=4, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=32),
    "toy-4l-wide": dict(n_layers=4, d_model=128, n_heads=8, d_head=16, d_mlp=512, n_ctx=32),
    "toy-6l8h": dict(n_layers=6, d_model=128, n_heads=8, d_head=16, d_mlp=512, n_ctx=32),
    "toy-8l8h": dict(n_layers=8, d_model=128, n_heads=8, d_head=16, d_mlp=512, n_ctx=32),
    "toy-2l": dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128, n_ctx=32),
}
_TOY_DEFAULTS = dict(act_fn="gelu", normalization_type="LN", d_vocab=VOCAB.d_vocab,
                     positional_embedding_type="standard")

# Architectures whose blocks normalise after the residual add; circuitkit rejects them.
POST_LN_ARCHITECTURES = {"BertForMaskedLM", "BertModel", "HookedEncoder"}


def toy_config(arch: str | dict[str, Any] = "toy-4l", seed: int = 0, **overrides) -> HookedTransformerConfig:
    """A toy ``HookedTransformerConfig`` from a name in ``TOY_CONFIGS`` or a dict of fields."""
    if isinstance(arch, str):
        if arch not in TOY_CONFIGS:
            raise CircuitkitError(f"unknown toy architecture {arch!r}; choose one of {sorted(TOY_CONFIGS)} "
                                  "or pass a dict of HookedTransformerConfig fields")
        fields = dict(TOY_CONFIGS[arch])
    else:
        fields = dict(arch)
    fields = {**_TOY_DEFAULTS, **fields, **overrides, "seed": seed}
    try:
        return HookedTransformerConfig(**fields)
    except (TypeError, ValueError, AssertionError) as e:
        raise CircuitkitError(f"invalid model configuration {fields}: {e}") from None


def build_model(cfg: HookedTransformerConfig, device: str | torch.device = "cpu") -> HookedTransformer:
    """A freshly initialised model; ``cfg.seed`` fixes its weights."""
    torch.manual_seed(cfg.seed if cfg.seed is not None else 0)
    model = HookedTransformer(cfg, move_to_device=False).to(device, print_details=False)
    model.circuitkit_vocab = TOY_VOCAB if cfg.d_vocab == VOCAB.d_vocab else None
    check_supported(model)
    return model


def check_supported(model: HookedTransformer) -> None:
    """Raise a clear error for architectures the circuit graph does not describe."""
    cfg = model.cfg
    arch = cfg.original_architecture or ""
    if arch in POST_LN_ARCHITECTURES:
        raise CircuitkitError(f"{cfg.model_name} ({arch}) is a post-LayerNorm model; circuitkit supports "
                              "decoder models with pre-norm blocks or no normalisation (GPT-2, Pythia, "
                              "attn-only-*, the toy zoo)")
    if cfg.attn_only and cfg.parallel_attn_mlp:
        raise CircuitkitError(f"{cfg.model_name} sets both attn_only and parallel_attn_mlp; an attention-only "
                              "model has no MLP to run in parallel (set parallel_attn_mlp=False)")
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre", None):
        raise CircuitkitError(f"unsupported normalization_type {cfg.normalization_type!r}: circuitkit supports "
                              "pre-norm models (LN, LNPre, RMS, RMSPre) and models without normalisation (None)")


# ---------------------------------------------------------------- saving and loading

def config_to_dict(cfg: HookedTransformerConfig) -> dict[str, Any]:
    d = dict(cfg.to_dict())  # to_dict() returns the live __dict__: never write into it
    d["dtype"] = str(d["dtype"]).replace("torch.", "")
    return {k: v for k, v in d.items() if _jsonable(v)}


def config_from_dict(d: dict[str, Any], source: str = "card") -> HookedTransformerConfig:
    if not isinstance(d, dict):
        raise CircuitkitError(f"{source}: 'config' must be a table of HookedTransformerConfig fields, got {d!r}")
    d = dict(d)
    dtype = getattr(torch, str(d.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise CircuitkitError(f"{source}: unknown dtype {d.get('dtype')!r} in 'config'")
    d["dtype"] = dtype
    for computed in ("n_params", "d_vocab_out"):
        d.pop(computed, None)
    try:
        return HookedTransformerConfig.from_dict(d)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise CircuitkitError(f"{source}: 'config' is not a valid model configuration: {e}") from None


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def save_model(model: HookedTransformer, directory: str | os.PathLike, card: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``card.json`` into ``directory``, each atomically.

    The card always records the config and the vocabulary; ``card`` adds the rest (tasks,
    seed, steps, wall time, held-out metrics, the command that made it).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    local_tokenizer = getattr(model, "circuitkit_local_tokenizer", False)
    if local_tokenizer:
        save_tokenizer(model.tokenizer, directory)
    full_card = {"config": config_to_dict(model.cfg),
                 "vocab": getattr(model, "circuitkit_vocab", TOY_VOCAB if model.tokenizer is None else None),
                 "tokenizer": (TOKENIZER_FILE if local_tokenizer else
                               getattr(model.tokenizer, "name_or_path", None) if model.tokenizer else None),
                 "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 **(card or {})}
    write_json(directory / CARD_FILE, full_card)
    return directory


def zoo_names() -> list[str]:
    if not ZOO_DIR.exists():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / CARD_FILE).exists())


def resolve_path(name_or_path: str | os.PathLike) -> Path | None:
    """The checkpoint folder for a zoo name or a local path; ``None`` for other names."""
    p = Path(name_or_path)
    if (ZOO_DIR / str(name_or_path) / CARD_FILE).exists():
        return ZOO_DIR / str(name_or_path)
    if p.is_dir():
        if not (p / CARD_FILE).exists():
            raise CircuitkitError(f"{p} is a folder but holds no {CARD_FILE}; a circuitkit checkpoint folder "
                                  f"has {WEIGHTS_FILE} and {CARD_FILE} (written by save_model / circuitkit train)")
        return p
    if p.suffix or os.sep in str(name_or_path):
        raise CircuitkitError(f"no checkpoint folder at {p}; give a zoo name ({', '.join(zoo_names()) or 'none'}), "
                              "a folder written by circuitkit, or a TransformerLens pretrained name like 'gpt2'")
    return None


def load_card(name_or_path: str | os.PathLike) -> dict[str, Any]:
    path = resolve_path(name_or_path)
    if path is None:
        return {"pretrained": str(name_or_path)}
    return read_json(path / CARD_FILE)


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
               gates: bool = True) -> HookedTransformer:
    """Load (a) a zoo name, (b) a circuitkit checkpoint folder, (c) a pretrained name (``gpt2``).

    The dense loader: a checkpoint with ``sparsity.json`` is refused unless ``gates=False``
    (its finetuned weights without gates); :func:`circuitkit.sparsity.load_model` loads any
    model and attaches a sparse model's gates in evaluation mode.
    """
    path = resolve_path(name_or_path)
    if path is None:
        model = _load_pretrained(str(name_or_path), device)
    else:
        card = read_json(path / CARD_FILE)
        if not isinstance(card, dict) or "config" not in card:
            raise CircuitkitError(f"{path / CARD_FILE} has no 'config' entry; it was not written by circuitkit")
        weights = path / WEIGHTS_FILE
        if card.get("base_model") and not weights.exists():
            model = load_model(card["base_model"], device, gates=False)
        else:
            if not weights.exists():
                raise CircuitkitError(f"{path} has a card but no {WEIGHTS_FILE}")
            model = HookedTransformer(config_from_dict(card["config"], str(path / CARD_FILE)), move_to_device=False)
            load_weights(model, weights)
            model = model.to(device, print_details=False)
            if card.get("tokenizer") == TOKENIZER_FILE:
                set_local_tokenizer(model, load_local_tokenizer(path))
            elif card.get("tokenizer"):
                model.set_tokenizer(_load_tokenizer(card["tokenizer"]))
        model.circuitkit_vocab = card.get("vocab")
        model.circuitkit_card = card
        check_supported(model)
        if gates and (path / SPARSITY_FILE).exists():  # gates are sparsity's, which builds on this module
            raise CircuitkitError(f"{path} is a sparse model (it holds {SPARSITY_FILE}); load it with "
                                  "circuitkit.sparsity.load_model to get its gates attached, or pass gates=False "
                                  "for its finetuned weights without gates")
    model.eval()
    return model


def load_weights(model: HookedTransformer, weights: Path) -> None:
    """Load ``weights`` (safetensors) into ``model`` strictly, checking that every parameter is finite.

    Buffers the constructor rebuilds (causal masks) may be absent; any other missing,
    unexpected or differently sized tensor means the file does not match its card.
    """
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type for a truncated or damaged file
        raise CircuitkitError(f"{weights} cannot be read as safetensors ({str(e).splitlines()[0][:200]}); the file is "
                              "truncated or damaged: restore it from where it came from or retrain") from None
    expected = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    missing = sorted(k for k in expected.keys() - state.keys() if k not in buffers)
    unexpected = sorted(state.keys() - expected.keys())
    resized = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or resized:
        card = weights.parent / CARD_FILE
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors the config has no place for "
                         f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        for k in resized[:3]:
            parts.append(f"{k} is {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} by the config")
        raise CircuitkitError(f"{weights} does not match the config in {card} (n_layers={model.cfg.n_layers}, "
                              f"d_model={model.cfg.d_model}, n_heads={model.cfg.n_heads}): {'; '.join(parts)}. "
                              "The card and the weights come from different models; restore the pair")
    for k in sorted(k for k, _ in model.named_parameters()):  # buffers may hold -inf on purpose (IGNORE)
        v = state[k]
        if not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise CircuitkitError(f"{weights}: {k} holds {bad} non-finite value(s) (NaN or Inf); every score computed "
                                  "from this model would be meaningless. Restore the file or retrain")
    model.load_state_dict(state, strict=False)


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """Write a local tokenizer's ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``,
    each file atomically (written in a temporary folder beside it, then renamed into place)."""
    import tempfile

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, directory / f.name)


def load_local_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved by :func:`save_tokenizer` in ``directory`` (no network involved)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / TOKENIZER_FILE).exists():
        raise CircuitkitError(f"{directory} has no {TOKENIZER_FILE}, which its card names as the model's tokenizer; "
                              "restore the file from where the model came from")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # a damaged or foreign JSON file: name it, whatever transformers raises
        raise CircuitkitError(f"{directory / TOKENIZER_FILE} cannot be read as a tokenizer "
                              f"({str(e).splitlines()[0][:200]}); restore it") from None


def set_local_tokenizer(model: HookedTransformer, tokenizer) -> None:
    """Set a tokenizer trained here on ``model``; :func:`save_model` then writes it beside the weights."""
    if len(tokenizer) > model.cfg.d_vocab:
        raise CircuitkitError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                              f"{model.cfg.d_vocab}; they come from different models")
    model.set_tokenizer(tokenizer)
    model.circuitkit_local_tokenizer = True
    model.circuitkit_vocab = None


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise CircuitkitError(f"could not load tokenizer {name!r} ({e}); put it in the Hugging Face cache "
                              "(HF_HOME) or set HF_HUB_OFFLINE=1 with a cache that holds it") from None


def _load_pretrained(name: str, device: str | torch.device) -> HookedTransformer:
    try:
        model = HookedTransformer.from_pretrained(name, device=device)
    except (OSError, ValueError, EnvironmentError) as e:
        msg = str(e).splitlines()[0][:300]
        local = Path(LOCAL_MODELS_DIR) / name
        if (local / CARD_FILE).exists():  # trained by a zoo config (out = "models/NAME") but not shipped
            raise CircuitkitError(f"{name!r} is not a zoo name or a pretrained model, but {local} holds a model of "
                                  f"that name (where the zoo configs write): give its path, {str(local)!r}, or ship "
                                  f"it into the zoo with --out circuitkit/zoo/{name}") from None
        hub = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise CircuitkitError(
            f"could not load pretrained model {name!r}: {msg}\n"
            f"If this machine has no access to the Hugging Face hub, put the model in a local cache "
            f"(HF_HOME={hub}) and set HF_HUB_OFFLINE=1, or use a zoo model ({', '.join(zoo_names()) or 'none shipped'}) "
            "or a checkpoint folder written by circuitkit.") from None
    for k, v in model.named_parameters():
        if not bool(torch.isfinite(v).all()):
            raise CircuitkitError(f"pretrained model {name!r}: {k} holds non-finite values (NaN or Inf); the cached "
                                  "weights are damaged: delete them from the Hugging Face cache and fetch them again")
    model.circuitkit_vocab = None
    model.circuitkit_card = {"pretrained": name}
    check_supported(model)
    return model
