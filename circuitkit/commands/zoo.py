"""``circuitkit zoo``: list the models shipped inside the package, with their cards."""

from __future__ import annotations

import argparse
import json

from circuitkit import CircuitkitError
from circuitkit.models import load_card, resolve_path, zoo_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one model's full card (a zoo name or a checkpoint folder)")


def run_cli(args: argparse.Namespace) -> int:
    if args.name:
        if resolve_path(args.name) is None:  # not a zoo name, not a checkpoint folder: no card to show
            raise CircuitkitError(f"no zoo model {args.name!r}; the zoo has {', '.join(zoo_names()) or 'no models'} "
                                  "(or give a checkpoint folder)")
        print(json.dumps(load_card(args.name), indent=2))
        return 0
    for name in zoo_names():
        card = load_card(name)
        cfg = card.get("config", {})
        accs = {t: round(v["accuracy"], 4) for t, v in card.get("heldout", {}).items() if "accuracy" in v}
        what = f"held-out accuracy={accs}" if accs else f"held-out CE={card.get('heldout_ce', float('nan')):.4f}"  # an LM
        print(f"{name:28s} L={cfg.get('n_layers')} H={cfg.get('n_heads')} d={cfg.get('d_model')} "
              f"steps={card.get('steps')} {what}")
    return 0
