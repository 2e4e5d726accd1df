"""Plots drawn from the benchmarks' JSON files (never from live measurements).

``python -m bench.plots FILE.json [...]`` redraws ``FILE.png`` for latency and e2e
results (the accuracy plot is drawn by :mod:`bench.accuracy.report`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_IMPL_STYLE = {
    "reference": ("tab:gray", "o"),
    "cpu": ("tab:orange", "v"),
    "floor": ("black", ""),
    "torch": ("tab:blue", "s"),
    "torch-cuda": ("tab:green", "^"),
    "triton": ("tab:red", "D"),
}


def plot_latency(result: dict[str, Any], path: Path) -> None:
    """Median call time against B, log-log: one panel per (mode, steps) and V, one
    line per implementation, with the p20-p80 band."""
    rows = result["rows"]
    variants = sorted({(r["mode"], r["steps"] or 0) for r in rows})
    vocabs = sorted({r["vocab"] for r in rows})
    fig, axes = plt.subplots(
        len(variants),
        len(vocabs),
        squeeze=False,
        figsize=(4.2 * len(vocabs), 3.0 * len(variants)),
    )
    for i, (mode, steps) in enumerate(variants):
        for j, vocab in enumerate(vocabs):
            ax = axes[i][j]
            cell = [
                r
                for r in rows
                if r["mode"] == mode
                and (r["steps"] or 0) == steps
                and r["vocab"] == vocab
            ]
            for impl in dict.fromkeys(r["impl"] for r in cell):
                line = sorted(
                    (r for r in cell if r["impl"] == impl), key=lambda r: r["batch"]
                )
                color, marker = _IMPL_STYLE.get(impl, ("black", "x"))
                xs = [r["batch"] for r in line]
                ax.plot(
                    xs,
                    [r["median_ms"] for r in line],
                    marker=marker,
                    color=color,
                    linestyle=":" if impl == "floor" else "-",
                    label="floor (one exp pass)" if impl == "floor" else impl,
                )
                ax.fill_between(
                    xs,
                    [r["p20_ms"] for r in line],
                    [r["p80_ms"] for r in line],
                    color=color,
                    alpha=0.15,
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sorted({r["batch"] for r in cell}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            name = (
                f"{mode}, {steps} steps" if mode == "logits" else "adaptive temperature"
            )
            ax.set_title(f"{name}, V={vocab:,}", fontsize=9)
            ax.set_xlabel("batch B")
            ax.set_ylabel("ms per call (median)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    env = result.get("environment", {})
    device = env.get("gpu") or f"CPU x{env.get('cpus')}"
    fig.suptitle(f"EM-INF latency per [B, V] batch on {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_e2e(result: dict[str, Any], path: Path) -> None:
    """Decode throughput (tokens/s) on and off per batch size, one panel per model,
    with the on/off ratio written above each pair."""
    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(
        1, len(models), squeeze=False, figsize=(4.5 * len(models), 3.6)
    )
    for ax, model in zip(axes[0], models, strict=True):
        cell = sorted(
            (r for r in rows if r["model"] == model), key=lambda r: r["batch"]
        )
        xs = range(len(cell))
        off = [r["off"]["decode_tokens_per_s"] for r in cell]
        on = [r["on"]["decode_tokens_per_s"] for r in cell]
        ax.bar([x - 0.2 for x in xs], off, 0.4, label="EM-INF off", color="tab:gray")
        ax.bar([x + 0.2 for x in xs], on, 0.4, label="EM-INF on", color="tab:blue")
        for x, r, top in zip(xs, cell, map(max, off, on), strict=True):
            ax.annotate(
                f"{100 * r['throughput_ratio_on_off']:.0f}%",
                (x, top),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(list(xs), [f"batch {r['batch']}" for r in cell])
        ax.set_ylabel("decode tokens / s")
        ax.set_title(f"{model} (V={cell[0]['vocab']:,})", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    env = result.get("environment", {})
    fig.suptitle(
        f"vLLM decode throughput, EM-INF on vs off (same engine), "
        f"{env.get('device', '')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTTERS = {"latency": plot_latency, "e2e": plot_e2e}


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m bench.plots RESULT.json [...]", file=sys.stderr)
        return 2
    for path in paths:
        result = json.loads(path.read_text())
        plotter = PLOTTERS.get(result.get("kind"))
        if plotter is None:
            print(
                f"{path}: no plotter for kind {result.get('kind')!r}", file=sys.stderr
            )
            return 1
        plotter(result, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
