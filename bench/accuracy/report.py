"""Summaries of accuracy runs: statistics per (task, setting), a Markdown table and a
plot, all computed from the per-problem 0/1 outcomes stored in the run's JSON.

``outcomes[task][setting][seed]`` is a list of 0/1 per problem (same problem order
for every setting); greedy runs are stored under the seed key ``"-"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.accuracy.stats import (
    bootstrap_mean_interval,
    mcnemar_exact,
    paired_bootstrap_difference,
    wilson_interval,
)

Outcomes = dict[str, dict[str, dict[str, list[int]]]]


def _seed_pairs(runs: dict[str, list[int]], base: dict[str, list[int]]) -> list:
    """Seed pairs compared by McNemar: same seeds where both are seeded; every seed
    of the seeded side against the single run of an unseeded one."""
    common = sorted(set(runs) & set(base))
    if common:
        return [(seed, seed) for seed in common]
    return [(a, b) for a in sorted(runs) for b in sorted(base)]


def summarize(outcomes: Outcomes, baseline: str | None) -> dict[str, Any]:
    """Per task and setting: accuracy per seed (Wilson 95%), mean over seeds with a
    bootstrap 95% interval over problems, and the paired difference to ``baseline``
    (bootstrap 95% interval of the per-problem seed-averaged difference; exact
    McNemar p-value per seed pair)."""
    summary: dict[str, Any] = {}
    for task, by_setting in outcomes.items():
        rows = {}
        for setting, runs in by_setting.items():
            per_problem = np.mean([runs[seed] for seed in sorted(runs)], axis=0)
            n = len(per_problem)
            per_seed = {}
            for seed, outcome in sorted(runs.items()):
                correct = int(sum(outcome))
                low, high = wilson_interval(correct, n)
                per_seed[seed] = {
                    "correct": correct,
                    "accuracy": correct / n if n else float("nan"),
                    "wilson95": [low, high],
                }
            low, high = bootstrap_mean_interval(per_problem)
            row: dict[str, Any] = {
                "problems": n,
                "seeds": sorted(runs),
                "accuracy": float(per_problem.mean()) if n else float("nan"),
                "bootstrap95": [low, high],
                "per_seed": per_seed,
            }
            if baseline is not None and setting != baseline and baseline in by_setting:
                base_runs = by_setting[baseline]
                base_per_problem = np.mean(
                    [base_runs[seed] for seed in sorted(base_runs)], axis=0
                )
                diff, d_low, d_high = paired_bootstrap_difference(
                    per_problem, base_per_problem
                )
                tests = []
                for seed, base_seed in _seed_pairs(runs, base_runs):
                    wins, losses, p = mcnemar_exact(runs[seed], base_runs[base_seed])
                    tests.append(
                        {
                            "seed": seed,
                            "baseline_seed": base_seed,
                            "only_this": wins,
                            "only_baseline": losses,
                            "p_value": p,
                        }
                    )
                row["vs_baseline"] = {
                    "baseline": baseline,
                    "difference": diff,
                    "bootstrap95": [d_low, d_high],
                    "mcnemar": tests,
                }
            rows[setting] = row
        summary[task] = rows
    return summary


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown_table(summary: dict[str, Any]) -> str:
    """One Markdown table: a row per (task, setting); the last column, the share of
    responses cut at ``max_tokens``, is filled where the row has
    ``truncated_fraction``."""
    lines = [
        "| task | setting | problems | seeds | accuracy % (95% CI) | per seed % "
        "| vs baseline, points (95% CI) | McNemar p (per seed) | hit max_tokens % |",
        "|---|---|---:|---:|---|---|---|---|---:|",
    ]
    for task, rows in summary.items():
        for setting, row in rows.items():
            low, high = row["bootstrap95"]
            per_seed = ", ".join(_pct(s["accuracy"]) for s in row["per_seed"].values())
            versus, p_values = "", ""
            cut = _pct(row["truncated_fraction"]) if "truncated_fraction" in row else ""
            if "vs_baseline" in row:
                cmp_ = row["vs_baseline"]
                d_low, d_high = cmp_["bootstrap95"]
                versus = (
                    f"{100 * cmp_['difference']:+.1f} ({100 * d_low:+.1f}, "
                    f"{100 * d_high:+.1f}) vs {cmp_['baseline']}"
                )
                p_values = ", ".join(f"{t['p_value']:.2g}" for t in cmp_["mcnemar"])
            lines.append(
                f"| {task} | {setting} | {row['problems']} | {len(row['seeds'])} "
                f"| {_pct(row['accuracy'])} ({_pct(low)}-{_pct(high)}) | {per_seed} "
                f"| {versus} | {p_values} | {cut} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    """Grouped bars: accuracy per setting for each task, bootstrap 95% error bars,
    seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    settings = list(dict.fromkeys(s for rows in summary.values() for s in rows))
    width = 0.8 / max(1, len(settings))
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(tasks), 4.2))
    for i, setting in enumerate(settings):
        xs, ys, errs = [], [], [[], []]
        for t, task in enumerate(tasks):
            row = summary[task].get(setting)
            if row is None:
                continue
            x = t + (i - (len(settings) - 1) / 2) * width
            xs.append(x)
            ys.append(100 * row["accuracy"])
            errs[0].append(100 * (row["accuracy"] - row["bootstrap95"][0]))
            errs[1].append(100 * (row["bootstrap95"][1] - row["accuracy"]))
            seeds = [100 * s["accuracy"] for s in row["per_seed"].values()]
            ax.scatter([x] * len(seeds), seeds, color="black", s=8, zorder=3)
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=setting)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
