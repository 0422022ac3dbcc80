"""Seeded sampling helpers shared by the tasks.

Every task draws all of its randomness from one ``torch.Generator`` so that the same seed
gives the same dataset on every machine, and a training run that restores the generator
state continues exactly. These helpers keep that rule in one place.
"""

from __future__ import annotations

import torch

from circuitkit import CircuitkitError

_ARGSORT_LIMIT = 4096  # above this pool size, draw with rejection instead of sorting [n, pool]


def sample_distinct(n: int, k: int, pool: int, generator: torch.Generator,
                    exclude: torch.Tensor | None = None) -> torch.Tensor:  # -> [n, k]
    """``k`` distinct indices in ``[0, pool)`` per row, avoiding ``exclude[b]`` ([n, m]) in row ``b``.

    The order within a row is random too, so the result doubles as a random arrangement.
    """
    m = 0 if exclude is None else exclude.shape[1]
    if k + m > pool:
        raise CircuitkitError(f"cannot draw {k} distinct items from a pool of {pool} while excluding {m}; "
                              "use a larger word list or fewer slots")
    if pool <= _ARGSORT_LIMIT:
        scores = torch.rand(n, pool, generator=generator)  # [n, pool]
        if exclude is not None:
            scores.scatter_(1, exclude, 2.0)  # excluded items sort last
        return scores.argsort(-1)[:, :k]
    out = torch.randint(pool, (n, k), generator=generator)  # [n, k]
    for _ in range(1000):
        bad = _has_repeat(out)
        if exclude is not None:
            bad |= (out[:, :, None] == exclude[:, None, :]).any(-1).any(-1)
        if not bad.any():
            return out
        out[bad] = torch.randint(pool, (int(bad.sum()), k), generator=generator)
    raise AssertionError("rejection sampling did not converge")  # pool >> k makes this unreachable


def _has_repeat(x: torch.Tensor) -> torch.Tensor:  # [n, k] -> [n] bool
    s = x.sort(-1).values
    return (s[:, 1:] == s[:, :-1]).any(-1)


def sample_from(values: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:  # [n]
    """``n`` draws (with replacement) from the 1-d tensor ``values``."""
    return values[torch.randint(len(values), (n,), generator=generator)]
