"""The GECO-style constrained objective of docs/method.md §1.

Minimise ``S = w_attn·S_attn + w_mlp·S_mlp`` subject to ``CE ≤ target``, through the
Lagrangian ``S + λ·(CE − target)`` with ``λ = exp(ρ)``. After every step
``ρ ← clamp(ρ + η·(EMA(CE) − target)/target, ρ_min, ρ_max)``: λ grows while the
constraint is violated and shrinks while it holds, holding the loss at the target while
the sparsity falls. The state (ρ, the EMA) is a few floats, saved in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from circuitkit import CircuitkitError


@dataclass
class GecoState:
    rho: float = 0.0
    ema: float | None = None  # EMA of the constraint's CE; None before the first step

    @property
    def lam(self) -> float:
        return math.exp(self.rho)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GecoState":
        return cls(rho=float(d["rho"]), ema=None if d.get("ema") is None else float(d["ema"]))


@dataclass(frozen=True)
class Geco:
    """The constraint ``CE ≤ target`` and its multiplier update."""

    target: float
    eta: float = 0.01  # ρ step size, per unit relative violation
    ema_decay: float = 0.9  # EMA(CE) ← decay·EMA + (1 − decay)·CE
    rho_min: float = -10.0
    rho_max: float = 10.0

    def __post_init__(self) -> None:
        if not (self.target > 0 and math.isfinite(self.target)):
            raise CircuitkitError(f"the CE target must be a positive finite number, got {self.target}")
        if self.eta < 0 or not math.isfinite(self.eta):
            raise CircuitkitError(f"eta must be a non-negative number, got {self.eta}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise CircuitkitError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.rho_min > self.rho_max:
            raise CircuitkitError(f"rho_min ({self.rho_min}) must not exceed rho_max ({self.rho_max})")

    def lagrangian(self, sparsity: torch.Tensor, ce: torch.Tensor, state: GecoState) -> torch.Tensor:
        """``S + λ·(CE − target)`` with the current (constant) λ."""
        return sparsity + state.lam * (ce - self.target)

    def update(self, state: GecoState, ce: float) -> GecoState:
        """Fold this step's CE into the EMA and move ρ; returns the new state."""
        ema = ce if state.ema is None else self.ema_decay * state.ema + (1.0 - self.ema_decay) * ce
        rho = state.rho + self.eta * (ema - self.target) / self.target
        rho = min(self.rho_max, max(self.rho_min, rho))
        return GecoState(rho=rho, ema=ema)


def sparsity_objective(s_attn: torch.Tensor | None, s_mlp: torch.Tensor | None, w_attn: float = 1.0,
                       w_mlp: float = 1.0) -> torch.Tensor:
    """``S = w_attn·S_attn + w_mlp·S_mlp`` over the families that are on."""
    terms = []
    if s_attn is not None:
        terms.append(w_attn * s_attn)
    if s_mlp is not None:
        terms.append(w_mlp * s_mlp)
    if not terms:
        raise CircuitkitError("no sparsity term: the forward collected no gate statistics (gates.collect off?)")
    return sum(terms)  # type: ignore[return-value]
