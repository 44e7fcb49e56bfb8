"""Card figures: a latency histogram per variant and EM/F1 with CI bars, as PNGs next to the card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.schema import headline_split

__all__ = ["write_plots"]


def write_plots(results: dict[str, Any], out_dir: Path, link_prefix: str) -> dict[str, str]:
    """Write the profile's PNGs into ``out_dir``; return {title: link} for the card. Empty when nothing to plot."""
    try:
        import matplotlib
    except ImportError:  # plots are optional: the table and results.json carry every figure
        return {}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_write_bytes

    profile = results["profile"]
    order = [v for v in results.get("variant_order", []) if v in results["variants"]]
    links: dict[str, str] = {}
    out_dir = Path(out_dir)

    def save(fig, name: str, title: str) -> None:
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        atomic_write_bytes(out_dir / name, buf.getvalue())
        links[title] = f"{link_prefix}/{name}"

    samples = {v: (results["variants"][v].get("latency") or {}).get("samples_s") for v in order}
    samples = {v: s for v, s in samples.items() if s}
    if samples:
        # one shared x axis, so variants compare by eye; constrained layout keeps the title off the subplot titles
        fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 2.9), squeeze=False, sharex=True,
                                 layout="constrained")
        for ax, (v, s) in zip(axes[0], samples.items()):
            ax.hist(s, bins=min(20, max(5, len(s) // 3)), color="#4C72B0")
            ax.set_title(v)
            ax.set_xlabel("seconds per generate call")
        fig.suptitle(f"{profile}: greedy generation latency ({len(next(iter(samples.values())))} rounds)")
        save(fig, f"{profile}-latency.png", f"{profile} latency histogram")

    split = headline_split(results.get("headline_split"), results.get("eval_splits") or ["validation"])
    quality = {v: (results["variants"][v].get("quality") or {}).get(split) for v in order}
    quality = {v: q for v, q in quality.items() if q}
    if quality and results.get("show_quality", True):
        fig, ax = plt.subplots(figsize=(1.4 * len(quality) + 2, 2.8))
        for i, metric in enumerate(("em", "f1")):
            xs = [j + (i - 0.5) * 0.35 for j in range(len(quality))]
            ys = [q[metric] for q in quality.values()]
            err = [[y - q[f"{metric}_ci"][0] for y, q in zip(ys, quality.values())],
                   [q[f"{metric}_ci"][1] - y for y, q in zip(ys, quality.values())]]
            ax.bar(xs, ys, width=0.35, yerr=err, capsize=3, label=metric.upper())
        ax.set_xticks(range(len(quality)), list(quality))
        ax.set_ylim(0, 1.05)
        ax.legend()
        ax.set_title(f"{profile}: EM / F1 on the {split} split (95% CI)")
        save(fig, f"{profile}-quality.png", f"{profile} EM/F1 with 95% CIs")
    return links
