"""`gkd plan --plot timeline.png` (.svg, .pdf): predicted memory per GPU over one micro-step of the schedule.

A stacked area per memory category (the same replay as `gkd.planner.schedule.simulate`, kept per category),
the budget as a line, and the peak marked. matplotlib with the Agg backend (no display needed), imported
only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path

from gkd.planner.plan import CATEGORIES, Plan, TensorAlloc

GiB = 1 << 30


def category_series(plan: Plan) -> dict[str, list[int]]:
    """Bytes per category at each operation's high point (static + live allocations)."""
    static = dict.fromkeys(CATEGORIES, 0)
    for a in plan.schedule.static:
        static[a.category] += a.bytes
    live: dict[str, TensorAlloc] = {}
    series: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    for op in plan.schedule.ops:
        for a in op.allocs:
            live[a.name] = a
        now = dict.fromkeys(CATEGORIES, 0)
        for a in live.values():
            now[a.category] += a.bytes
        for c in CATEGORIES:
            base = static[c] if op.phase != "offline" or c == "reserve" else 0
            series[c].append(base + now[c])
        for name in op.frees:
            live.pop(name, None)
    return series


def plot_timeline(plan: Plan, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = category_series(plan)
    x = list(range(len(plan.schedule.ops)))
    fig, ax = plt.subplots(figsize=(12, 5), dpi=100)
    ax.stackplot(x, *[[v / GiB for v in series[c]] for c in CATEGORIES], labels=list(CATEGORIES), alpha=0.85)
    ax.axhline(plan.budget_bytes / GiB, color="black", linestyle="--", linewidth=1, label="budget")
    totals = [sum(series[c][i] for c in CATEGORIES) for i in x]
    if totals:
        peak = max(range(len(totals)), key=lambda i: totals[i])
        ax.annotate(
            f"peak {totals[peak] / GiB:.1f} GiB\n{plan.schedule.ops[peak].name}",
            xy=(peak, totals[peak] / GiB),
            xytext=(0, 12),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    # Mark where each model's phase starts.
    last = None
    for i, op in enumerate(plan.schedule.ops):
        label = f"{op.kind.split('_')[0]} {op.model}"
        if label != last:
            ax.axvline(i, color="grey", linewidth=0.4)
            last = label
    ax.set_xlabel("operation (one micro-step, then the optimizer step)")
    ax.set_ylabel("GiB per GPU")
    verdict = "fits" if plan.fits else "does not fit"
    ax.set_title(f"gkd plan: predicted memory per GPU ({verdict}; {plan.strategy.describe()})", fontsize=8)
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    ax.set_xlim(0, max(1, len(x) - 1))
    top = max([plan.budget_bytes, *totals]) / GiB
    ax.set_ylim(0, top * 1.18)  # room for the peak label under the title
    fig.tight_layout()
    fig.savefig(path, format=Path(path).suffix.lower().lstrip(".") or "png")
    plt.close(fig)
