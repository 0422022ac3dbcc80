"""``circuitkit zoo``: list the models shipped inside the package, with their cards."""

from __future__ import annotations

import argparse
import json

from circuitkit.models import load_card, zoo_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one model's full card")


def run_cli(args: argparse.Namespace) -> int:
    if args.name:
        print(json.dumps(load_card(args.name), indent=2))
        return 0
    for name in zoo_names():
        card = load_card(name)
        cfg = card.get("config", {})
        accs = {t: round(v["accuracy"], 4) for t, v in card.get("heldout", {}).items()}
        print(f"{name:28s} L={cfg.get('n_layers')} H={cfg.get('n_heads')} d={cfg.get('d_model')} "
              f"steps={card.get('steps')} held-out accuracy={accs}")
    return 0
