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
    """Perplexity change against bytes on disk, the Pareto frontier drawn through the best rows."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    done = [r for r in rows if "error" not in r]
    xs = [r["checkpoint_bytes"] / 1e6 for r in done]
    ys = [r["ppl_change_pct"] for r in done]
    fig, ax = plt.subplots(figsize=(9, 6))
    for source, marker, label in ((BITSANDBYTES, "x", "bitsandbytes (on the fly)"), (None, "o", "compressor and float")):
        idx = [i for i, r in enumerate(done) if (r["source"] == BITSANDBYTES) == (source == BITSANDBYTES)]
        ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], marker=marker, s=60 if marker == "x" else 30, label=label, zorder=3)
    for x, y, r in zip(xs, ys, done):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(list(zip(xs, ys)))
    ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="tab:green", alpha=0.6, label="Pareto frontier", zorder=2)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)  # +0.5% and +5000% on one readable axis
    ax.set_xlabel("checkpoint size on disk (MB, log scale)")
    ax.set_ylabel("perplexity change against float32 (%, symlog)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
