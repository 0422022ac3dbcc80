"""Paper figures from circuitkit results (matplotlib, PNG and SVG side by side).

Owns the drawing only: every function takes results computed elsewhere
(:class:`circuitkit.evaluation.study.TaskResult`, graphs) and writes ``<stem>.png`` and
``<stem>.svg``. Uses the non-interactive Agg backend, so it runs on machines without a screen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from circuitkit.circuits.graph import Graph  # noqa: E402
from circuitkit.io import atomic_path  # noqa: E402

BASE_COLOR, SPARSE_COLOR = "#4c72b0", "#dd8452"


def save(fig, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` atomically; return both paths."""
    out = []
    for ext in ("png", "svg"):
        path = Path(stem).with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=130, bbox_inches="tight")
        out.append(path)
    plt.close(fig)
    return out


def _ratio_text(a, b) -> str:
    if a is None or b is None:
        return "n/a"
    return "∞" if b == 0 else f"{a / b:.1f}×"


def faithfulness_figure(pairs: Sequence[tuple], stem: Path, threshold: float = 0.9) -> list[Path]:
    """Explained effect vs edges kept (top row, log axis) and vs heads kept (bottom row),
    base vs sparse, one column per task; the size ratio at f = threshold on each panel.

    ``pairs``: (title, base TaskResult, sparse TaskResult).
    """
    n = len(pairs)
    fig, axes = plt.subplots(2, n, figsize=(3.4 * n, 6.2), squeeze=False)
    for col, (title, base, sparse) in enumerate(pairs):
        ax = axes[0, col]
        for r, color, label in ((base, BASE_COLOR, "base"), (sparse, SPARSE_COLOR, "sparse")):
            c = r.edge_curve
            xs = [max(k, 0.8) for k in c.kept]
            ax.plot(xs, c.f, "-o", ms=2.5, color=color, label=f"{label} ({r.n_edges} edges)")
            ax.axvline(max(r.n_edges, 0.8), color=color, ls=":", lw=1)
        ax.set_xscale("log")
        ax.axhline(threshold, color="gray", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edges kept")
        ax.set_ylim(-0.2, 1.15)
        ax.text(0.03, 0.95, f"edges base/sparse = {_ratio_text(base.n_edges, sparse.n_edges)}",
                transform=ax.transAxes, fontsize=8, va="top")
        ax.legend(fontsize=7, loc="lower right")
        ax = axes[1, col]
        for r, color, label in ((base, BASE_COLOR, "base"), (sparse, SPARSE_COLOR, "sparse")):
            c = r.head_curve
            ax.plot(c.sizes, c.f, "-o", ms=2.5, color=color, label=f"{label} ({r.heads_minimal} heads)")
        ax.axhline(threshold, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("heads kept (all MLPs kept)")
        ax.set_ylim(-0.2, 1.15)
        ax.text(0.03, 0.95, f"heads base/sparse = {_ratio_text(base.heads_minimal, sparse.heads_minimal)}",
                transform=ax.transAxes, fontsize=8, va="top")
        ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].set_ylabel("explained effect f")
    axes[1, 0].set_ylabel("explained effect f")
    fig.tight_layout()
    return save(fig, stem)


# The paper's range on its own graphs (GPT-2 small: about 32k edges, 144 heads; OLMo-7B larger),
# drawn at GPT-2's size for orientation.
PAPER_EDGE_RATIOS, PAPER_HEAD_RATIOS = (5.4, 97.0), (1.4, 4.5)
GPT2_GRAPH_EDGES, GPT2_GRAPH_HEADS = 32_000, 144


def ratio_vs_size_figure(table, stem: Path, threshold: float = 0.9) -> list[Path]:
    """Base ÷ sparse size of the minimal circuit (edges, heads) against the size of the graph.

    ``table``: the study's base-vs-sparse table with ``graph_edges``, ``graph_heads``,
    ``edge_ratio``, ``head_ratio``, ``task`` and ``base_model`` columns; one point per row,
    the median per graph size joined by a line, the paper's range at GPT-2's size.
    """
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.9))
    tasks = list(dict.fromkeys(table["task"]))
    colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(tasks)}
    for ax, size_col, ratio_col, paper, gpt2, what in (
            (axes[0], "graph_edges", "edge_ratio", PAPER_EDGE_RATIOS, GPT2_GRAPH_EDGES, "edges"),
            (axes[1], "graph_heads", "head_ratio", PAPER_HEAD_RATIOS, GPT2_GRAPH_HEADS, "heads")):
        finite = table[[math.isfinite(v) and v > 0 for v in table[ratio_col]]]
        labelled = set()
        for _, row in finite.iterrows():
            task = row["task"]
            ax.scatter(row[size_col], row[ratio_col], color=colors[task], s=28, zorder=3, alpha=0.85,
                       label=task if what == "edges" and task not in labelled else None)
            labelled.add(task)
        med = finite.groupby(size_col)[ratio_col].median().sort_index()
        ax.plot(med.index, med.values, "-", color="k", lw=1, zorder=2, label="median" if what == "edges" else None)
        ax.vlines(gpt2, *paper, color="gray", lw=6, alpha=0.4, zorder=1)
        ax.text(gpt2, paper[1], "paper\n(GPT-2, OLMo)", fontsize=7, ha="center", va="bottom")
        ax.axhline(1, color="gray", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted({*map(float, table[size_col]), float(gpt2)}))
        top = 1.5 * max(paper[1], float(finite[ratio_col].max()) if len(finite) else 1.0)
        ax.set_yticks([t for t in (1, 2, 3, 5, 10, 20, 50, 100, 200, 500) if t <= top])
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,g}"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"{what} in the graph")
        ax.set_ylabel(f"base ÷ sparse {what} (f ≥ {threshold})")
        for size, models in table.groupby(size_col)["base_model"].unique().items():
            ax.annotate(", ".join(models), (size, ax.get_ylim()[0]), fontsize=6, rotation=90, va="bottom",
                        ha="right", color="gray")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Minimal circuits: how much smaller the sparse model's are, against graph size", fontsize=10)
    fig.tight_layout()
    return save(fig, stem)


def _node_xy(graph: Graph) -> dict[int, tuple[float, float]]:
    """Grid position of each node: column = head index (MLP after the heads), row = layer."""
    spec = graph.spec
    H, L = spec.n_heads, spec.n_layers
    pos = {0: (H / 2, -1.0), spec.logits_node: (H / 2, float(L))}
    for l in range(L):
        for h in range(H):
            pos[spec.head_src(l, h)] = (float(h), l - 0.25)
        if spec.has_mlp:
            pos[spec.mlp_src(l)] = (H + 0.6, l + 0.2)
    return pos


def draw_circuit(ax, graph: Graph, title: str) -> None:
    """One circuit on a layer × component grid; edge width and opacity follow |score|."""
    spec = graph.spec
    pos = _node_xy(graph)
    node_in = graph.node_mask
    dst_node = spec.dst_node
    edges = graph.in_graph.nonzero().tolist()
    smax = max((abs(float(graph.scores[s, d])) for s, d in edges), default=1.0) or 1.0
    for s, d in edges:
        (x0, y0), (x1, y1) = pos[s], pos[int(dst_node[d])]
        w = abs(float(graph.scores[s, d])) / smax
        ax.plot([x0, x1], [y0, y1], color="#333333", lw=0.4 + 2.0 * w, alpha=0.25 + 0.6 * w, zorder=1)
    for i, (x, y) in pos.items():
        name = spec.node_names[i]
        on = bool(node_in[i])
        ax.scatter([x], [y], s=170 if on else 90, marker="s" if "h" in name and name.startswith("a") else "o",
                   color=(SPARSE_COLOR if on else "#dddddd"), edgecolor="black" if on else "#bbbbbb", zorder=2)
        if on or name in ("input", "logits"):
            ax.annotate(name, (x, y), fontsize=6, ha="center", va="center", zorder=3)
    ax.set_title(f"{title}\n{graph.n_edges} edges, {graph.n_heads} heads", fontsize=9)
    ax.set_yticks(range(spec.n_layers), [f"layer {l}" for l in range(spec.n_layers)], fontsize=7)
    ax.set_xticks([])
    ax.set_xlim(-0.8, spec.n_heads + 1.4)
    ax.set_ylim(-1.6, spec.n_layers + 0.6)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)


def circuit_figure(base: Graph, sparse: Graph, stem: Path, title: str = "") -> list[Path]:
    """Base and sparse minimal circuits side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    draw_circuit(axes[0], base, f"base {title}")
    draw_circuit(axes[1], sparse, f"sparse {title}")
    fig.tight_layout()
    return save(fig, stem)


def attention_edges(model, tokens, min_weight: float = 0.02):  # tokens [pos] -> [layers, heads, pos, pos]
    """Attention weights each head puts on each (query, key) pair, after any gates.

    Read at ``hook_pattern`` through a temporary hook, which runs after a sparse model's
    permanent gate hooks, so it sees ``softmax(s) ⊙ m``. Weights below ``min_weight`` are 0.
    """
    import torch

    captured = {}

    def grab(pattern, hook):
        captured[hook.layer()] = pattern.detach()[0]

    with torch.no_grad():
        model.run_with_hooks(tokens[None], fwd_hooks=[(lambda n: n.endswith("hook_pattern"), grab)])
    w = torch.stack([captured[l] for l in range(model.cfg.n_layers)])
    return torch.where(w >= min_weight, w, torch.zeros_like(w))


def attention_figure(models: Sequence[tuple[str, object]], prompts: Sequence[tuple[str, object]],
                     token_text, stem: Path, min_weight: float = 0.02) -> list[Path]:
    """The paper's teaser: token-level attention edges per layer, one row per (prompt, model).

    Each panel is one layer; an arc joins key j (bottom) to query i (top) when any head
    attends with weight ≥ ``min_weight``; width and opacity follow the largest head weight.
    The count of such (head, query, key) edges over all causal ones is in each row title.
    """
    rows = [(p_label, p, m_label, m) for p_label, p in prompts for m_label, m in models]
    n_layers = models[0][1].cfg.n_layers
    fig, axes = plt.subplots(len(rows), n_layers, figsize=(2.9 * n_layers, 1.6 * len(rows)), squeeze=False)
    for r, (p_label, tokens, m_label, model) in enumerate(rows):
        w = attention_edges(model, tokens, min_weight)  # [layers, heads, pos, pos]
        T = tokens.shape[0]
        causal = n_layers * model.cfg.n_heads * T * (T + 1) // 2
        kept = int((w > 0).sum())
        text = token_text(tokens)
        for l in range(n_layers):
            ax = axes[r, l]
            strength = w[l].max(0).values  # [pos, pos]
            for i, j in (strength > 0).nonzero().tolist():
                s = float(strength[i, j])
                ax.plot([j, i], [0, 1], color=SPARSE_COLOR if "sparse" in m_label else BASE_COLOR,
                        lw=0.3 + 1.7 * s, alpha=0.15 + 0.8 * s)
            for y in (0, 1):
                ax.scatter(range(T), [y] * T, s=6, color="black", zorder=3)
            ax.set_xticks(range(T), text, fontsize=6)
            ax.set_yticks([])
            ax.set_ylim(-0.15, 1.15)
            for side in ("top", "right", "left"):
                ax.spines[side].set_visible(False)
            if r == 0:
                ax.set_title(f"layer {l}", fontsize=9)
        axes[r, 0].set_ylabel(f"{m_label}\n{p_label}", fontsize=7, rotation=0, ha="right", va="center")
        axes[r, -1].text(1.02, 0.5, f"{kept}/{causal} edges\n({100 * kept / causal:.1f}%)", fontsize=7,
                         transform=axes[r, -1].transAxes, va="center")
    fig.tight_layout()
    return save(fig, stem)


# ---------------------------------------------------------------- token level (attention pairs)

def _mass_text(base_curve, sparse_curve, levels=(0.8, 0.9), paper: float | None = None) -> str:
    parts = []
    for p in levels:
        kb, ks = base_curve.k_at(p), sparse_curve.k_at(p)
        parts.append(f"{round(100 * p)}%: {kb}/{ks} = {_ratio_text(kb, ks)}")
    if paper is not None:
        parts.append(f"paper (GPT-2): {paper:g}×")
    return "\n".join(parts)


def pair_mass_figure(panels: Sequence[tuple], stem: Path, threshold: float = 0.9,
                     paper: dict[str, float] | None = None) -> list[Path]:
    """The paper's attribution-mass figure at the token level, one column per task.

    Top row: fraction of the total |attribution| held by the top-k attention pairs (log k);
    middle: by the top-k heads (head score = Σ |pair scores|); bottom: the explained effect f
    when only the top-k pairs are kept. Base vs sparse; the base ÷ sparse k at 80% and 90% of
    the mass, and the minimal-circuit ratio at f = ``threshold``, are written on each panel.

    ``panels``: (title, base PairResult, sparse PairResult), see :mod:`circuitkit.evaluation.pairs`.
    """
    paper = paper or {}
    n = len(panels)
    fig, axes = plt.subplots(3, n, figsize=(3.3 * n, 8.4), squeeze=False)
    for col, (title, base, sparse) in enumerate(panels):
        for row, unit in ((0, "pairs"), (1, "heads")):
            ax = axes[row, col]
            for r, color, label in ((base, BASE_COLOR, "base"), (sparse, SPARSE_COLOR, "sparse")):
                c = r.pair_mass if unit == "pairs" else r.head_mass
                ax.plot(range(1, len(c.fraction) + 1), c.fraction, "-", color=color, lw=1.4, label=label)
            for p in (0.8, 0.9):
                ax.axhline(p, color="gray", lw=0.6, ls=":")
            if unit == "pairs":
                ax.set_xscale("log")
            ax.set_ylim(0, 1.04)
            ax.set_xlabel(f"top-k {unit}")
            b, s = (base.pair_mass, sparse.pair_mass) if unit == "pairs" else (base.head_mass, sparse.head_mass)
            ax.text(0.97, 0.04, _mass_text(b, s, paper=paper.get(unit)), transform=ax.transAxes, fontsize=7,
                    ha="right", va="bottom", bbox=dict(facecolor="white", alpha=0.8, lw=0))
            if row == 0:
                ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7, loc="upper left")
        ax = axes[2, col]
        for r, color, label in ((base, BASE_COLOR, "base"), (sparse, SPARSE_COLOR, "sparse")):
            ax.plot(r.curve.sizes, r.curve.f, "-o", ms=2, color=color, label=f"{label} ({r.minimal.k} pairs)")
            ax.axvline(r.minimal.k, color=color, ls=":", lw=1)
        ax.axhline(threshold, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_ylim(-0.2, 1.15)
        ax.set_xlabel("top-k pairs kept (others removed)")
        ax.text(0.03, 0.95, f"minimal (f ≥ {threshold}): {_ratio_text(base.minimal.k, sparse.minimal.k)}",
                transform=ax.transAxes, fontsize=8, va="top")
        ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].set_ylabel("share of |attribution|\n(pairs)")
    axes[1, 0].set_ylabel("share of |attribution|\n(heads)")
    axes[2, 0].set_ylabel("explained effect f")
    fig.tight_layout()
    return save(fig, stem)


def draw_token_circuit(ax, scores, keep, tokens: Sequence[str], title: str) -> None:
    """One token-level circuit in the teaser's layout: positions (tokens) across, layers up.

    Pair (l, h, q, k) of ``keep`` ([layer, head, query, key] bool) is a line from key position k
    at height l to query position q at height l + 1, coloured by head, width following |score|.
    """
    L, H, T, _ = keep.shape
    pairs = keep.nonzero().tolist()
    smax = max((abs(float(scores[tuple(p)])) for p in pairs), default=1.0) or 1.0
    cmap = plt.cm.tab10 if H <= 10 else plt.cm.tab20
    for l, h, q, k in pairs:
        w = abs(float(scores[l, h, q, k])) / smax
        ax.plot([k, q], [l, l + 1], color=cmap(h % cmap.N), lw=0.6 + 2.4 * w, alpha=0.35 + 0.6 * w,
                solid_capstyle="round", zorder=2)
    for y in range(L + 1):
        ax.scatter(range(T), [y] * T, s=5, color="#999999", zorder=3)
    ax.set_xticks(range(T), list(tokens), fontsize=7)
    ax.set_yticks(range(L + 1), ["emb"] + [f"after {l}" for l in range(L)], fontsize=6)
    ax.set_xlim(-0.6, T - 0.4)
    ax.set_ylim(-0.3, L + 0.9)  # room for the legend above the last layer
    heads = sorted({(l, h) for l, h, _, _ in pairs})
    ax.set_title(f"{title}\n{len(pairs)} pairs, {len(heads)} heads", fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for h in sorted({h for _, h in heads}):
        ax.plot([], [], color=cmap(h % cmap.N), lw=2, label=f"head {h}")
    if heads:
        ax.legend(fontsize=6, loc="upper left", frameon=False, ncol=min(4, H))


# receiver kinds of a position edge, drawn in these colours
_RECEIVER_COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#ff7f0e", "mlp": "#9467bd", "logits": "#d62728"}


def _position_node_y(spec, node: int) -> float:
    """Height of a node in the position panel, on the pair panel's layer scale: input at 0, head h
    of layer l between l and l + 1 (by h), MLP l just below l + 1, logits above the last layer."""
    L, H = spec.n_layers, spec.n_heads
    if node == 0:
        return 0.0
    if node == spec.logits_node:
        return L + 0.45
    layer, within = divmod(node - 1, H + (0 if spec.attn_only else 1))
    if within < H:
        return layer + 0.15 + 0.55 * within / max(H - 1, 1)
    return layer + 0.85


def draw_position_circuit(ax, graph, tokens: Sequence[str], title: str) -> None:
    """A position-resolved circuit (:class:`~circuitkit.circuits.positions.PositionGraph`) in the
    teaser's layout: positions across, layers up. The edge ``u@p -> v@p`` is an arc at position p
    from sender u's height to receiver v's node, coloured by the receiver (q, k, v input of a
    head, MLP, logits); nodes with a circuit edge at that position are dark dots."""
    spec = graph.spec
    T = graph.n_positions
    edges = graph.in_graph.nonzero().tolist()  # [(pos, src, dst)]
    smax = max((abs(float(graph.scores[tuple(e)])) for e in edges), default=1.0) or 1.0
    used, kinds = set(), set()
    for p, src, dst in edges:
        node = int(spec.dst_node[dst])
        name = spec.dst_names[dst]
        kind = name[-2] if name.endswith(">") else ("logits" if node == spec.logits_node else "mlp")
        y0, y1 = _position_node_y(spec, src), _position_node_y(spec, node)
        w = abs(float(graph.scores[p, src, dst])) / smax
        ax.add_patch(FancyArrowPatch((p, y0), (p, y1), arrowstyle="-", connectionstyle="arc3,rad=-0.12",
                                     color=_RECEIVER_COLOURS[kind], lw=0.5 + 2.0 * w, alpha=0.35 + 0.6 * w, zorder=2))
        used.update({(p, src), (p, node)})
        kinds.add(kind)
    ys = [_position_node_y(spec, n) for n in range(spec.n_nodes)]
    for y in ys:
        ax.scatter(range(T), [y] * T, s=3, color="#cccccc", zorder=3)
    if used:
        px, py = zip(*[(p, _position_node_y(spec, n)) for p, n in used])
        ax.scatter(px, py, s=9, color="#333333", zorder=4)
    ax.set_xticks(range(T), list(tokens), fontsize=7)
    ax.set_yticks(range(spec.n_layers + 1), ["emb"] + [f"after {l}" for l in range(spec.n_layers)], fontsize=6)
    ax.set_xlim(-0.6, T - 0.4)
    ax.set_ylim(-0.3, spec.n_layers + 0.9)
    ax.set_title(f"{title}\n{len(edges)} position edges, {graph.n_heads} heads, "
                 f"{len({p for p, _, _ in edges})} positions", fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for k in _RECEIVER_COLOURS:
        if k in kinds:
            ax.plot([], [], color=_RECEIVER_COLOURS[k], lw=2, label=f"into {k}")
    if kinds:
        ax.legend(fontsize=6, loc="upper left", frameon=False, ncol=5)


def token_circuit_figure(rows: Sequence[tuple], stem: Path) -> list[Path]:
    """Token-level minimal circuits, base and sparse side by side, one row per prompt.

    ``rows``: (row label, tokens as text, panels), each panel either (title, PairScores, keep mask
    [layer, head, query, key]): the pairs of a minimal pair circuit, or (title, PositionGraph): the
    position edges of a minimal position-level circuit.
    """
    n_cols = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(5.2 * n_cols, 3.0 * len(rows)), squeeze=False)
    for r, (label, tokens, panels) in enumerate(rows):
        for c, panel in enumerate(panels):
            if len(panel) == 2:
                draw_position_circuit(axes[r, c], panel[1], tokens, f"{label}: {panel[0]}")
            else:
                title, scores, keep = panel
                draw_token_circuit(axes[r, c], scores.scores, keep, tokens, f"{label}: {title}")
        for c in range(len(panels), n_cols):
            axes[r, c].axis("off")
    fig.tight_layout()
    return save(fig, stem)


def training_curves_figure(runs: Sequence[tuple], stem: Path, smooth: int = 50) -> list[Path]:
    """A sparse run's course, several runs overlaid: kept edges against step (left), the training CE
    against its target (middle), and the held-out trade-off of the in-run evaluations (right:
    held-out CE against kept edges, one point per evaluation, joined in step order).

    ``runs``: (label, records, held-out bound or None, final point or None), records as in the
    run's ``log.jsonl``: each has ``step``, ``ce``, ``attn_hard_mean``; ``target`` (one constraint)
    and ``eval`` (``ce``, ``kept_edges``) where the run has them; the final point is the finished
    model's card (a dict with ``kept_edges`` and held-out ``ce``), drawn as a star. ``smooth``: the rolling
    window of the CE curve.
    """
    import pandas as pd

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    for i, (label, records, bound, final) in enumerate(runs):
        color = plt.cm.tab10(i % 10)
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [100 * r["attn_hard_mean"] for r in records], color=color, lw=0.8, label=label)
        hard = [r["step"] for r in records if r.get("mode") == "hard_st"]
        if hard:
            axes[0].axvline(hard[0], color=color, ls=":", lw=0.8)
        ce = pd.Series([r["ce"] for r in records], index=steps).rolling(smooth, min_periods=1).mean()
        axes[1].plot(ce.index, ce.values, color=color, lw=0.9, label=label)
        targets = [(r["step"], r["target"]) for r in records if r.get("target") is not None]
        if targets:
            axes[1].plot(*zip(*targets), color=color, ls="--", lw=0.8)
        evals = [(r["step"], r["eval"]) for r in records if isinstance(r.get("eval"), dict)]
        if evals:
            xs = [100 * e["kept_edges"] for _, e in evals]
            ys = [e["ce"] for _, e in evals]
            axes[2].plot(xs, ys, "-o", ms=3, color=color, lw=0.8, label=label)
            axes[2].annotate(f"{evals[-1][0]:,}", (xs[-1], ys[-1]), fontsize=6, color=color,
                             xytext=(3, 3), textcoords="offset points")
        if final is not None:
            axes[2].plot([100 * final["kept_edges"]], [final["ce"]], "*", ms=11, color=color, mec="k", mew=0.5)
        if bound is not None:
            axes[2].axhline(bound, color=color, ls="--", lw=0.8)
    axes[0].set_yscale("log")
    axes[2].set_xscale("log")
    for axis in (axes[0].yaxis, axes[2].xaxis):  # percentages on a log axis: 0.5, 1, 2, 5, 10, ...
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("kept causal attention edges, training batch (%)")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(f"training CE, rolling mean of {smooth} (dashed: target)")
    axes[2].set_xlabel("kept causal attention edges, held-out (%)")
    axes[2].set_ylabel("held-out CE (dashed: the model's bound)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("Sparse post-training: dotted lines mark where the deterministic phase starts; on the right, "
                 "the in-run evaluations (labelled: the last one's step) and the finished model's card (star)",
                 fontsize=9)
    fig.tight_layout()
    return save(fig, stem)
