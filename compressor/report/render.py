"""The trade-off report as people read it: a Markdown table and a plot of perplexity against bytes."""

from __future__ import annotations

from pathlib import Path

from .rows import BITSANDBYTES

_COLUMNS = (
    "row", "bits/param (quantized layers)", "bits/param (model)", "on disk", "peak RSS", "perplexity",
    "change", "KL to float32", "top-1 agreement", "decode tok/s",
)  # fmt: skip


def _cells(r: dict) -> list[str]:
    mb = 1e6
    qbits = f"{r['quantized_bits_per_param']:.3f}" if r.get("quantized_bits_per_param") else "-"
    return [
        r["name"], qbits, f"{r['model_bits_per_param']:.2f}", f"{r['checkpoint_bytes'] / mb:,.1f} MB",
        f"{r['peak_rss'] / mb:,.0f} MB", f"{r['perplexity']:.4g}", f"{r['ppl_change_pct']:+.1f}%", f"{r['kl']:.4f}",
        f"{100 * r['agreement']:.1f}%", f"{r['tokens_per_second']:.1f}",
    ]  # fmt: skip


def markdown_table(rows: list[dict]) -> str:
    """One line per row; a row that failed says so and where its log is."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|---|" + "---:|" * (len(_COLUMNS) - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |" + " |" * (len(_COLUMNS) - 2))
        else:
            lines.append("| " + " | ".join(_cells(r)) + " |")
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (smaller is better), by size."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Perplexity change against bytes on disk, Pareto frontier drawn; the right panel zooms into the useful rows."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    done = [r for r in rows if "error" not in r]
    points = [(r["checkpoint_bytes"] / 1e6, r["ppl_change_pct"]) for r in done]
    front = pareto_front(points)
    biggest = max(x for x, _ in points)
    # Useful: within 60% of float32's perplexity and well under float32's size.
    useful = [i for i, (x, y) in enumerate(points) if y <= 60 and x <= 0.6 * biggest] or list(range(len(done)))
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(15, 6))
    for ax, shown, label_all in ((full, range(len(done)), False), (zoom, useful, True)):
        for is_bnb, marker, label in ((True, "x", "bitsandbytes (on the fly)"), (False, "o", "compressor and float")):
            idx = [i for i in shown if (done[i]["source"] == BITSANDBYTES) == is_bnb]
            ax.scatter([points[i][0] for i in idx], [points[i][1] for i in idx], marker=marker, s=70 if is_bnb else 30, label=label, zorder=3)
        on_front = [i for i in front if i in shown]
        ax.step([points[i][0] for i in on_front], [points[i][1] for i in on_front], where="post", color="tab:green", alpha=0.6,
                label="Pareto frontier", zorder=2)  # fmt: skip
        for i in shown if label_all else on_front:
            ax.annotate(done[i]["name"], points[i], textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("checkpoint size on disk (MB)")
        ax.grid(True, which="both", alpha=0.3)
    full.set_xscale("log")
    full.set_yscale("symlog", linthresh=1.0)  # +0.5% and +10^6% on one readable axis
    full.set_ylim(bottom=min(-0.5, min(y for _, y in points)))
    full.set_ylabel("perplexity change against float32 (%, symlog)")
    full.set_title(f"{title}: every row (frontier labelled)")
    zoom.set_ylabel("perplexity change against float32 (%)")
    zoom.set_title("rows within 60% of float32's perplexity, below 60% of its size")
    full.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
