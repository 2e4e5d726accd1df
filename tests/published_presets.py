"""The presets' values as the authors published them, written out by hand: the
independent source the tests compare ``em_inf.config.PRESETS`` (and what a server
reports of them) against. Never built from ``em_inf``.

Source: the EM-INF paper's public scripts, "Hyperparameters used by the authors'
scripts" (delta / lam / eta / n), and Algorithm 1 (adaptive temperature) with the
authors' defaults (alpha 0.85, delta 1e-5, t_min 0.01, t_max 1.0).
"""

from __future__ import annotations

#: The temperature-mode fields every logits-mode preset carries unchanged:
#: Algorithm 1's defaults (alpha, t_min, t_max).
_ALGORITHM_1 = {"alpha": 0.85, "t_min": 0.01, "t_max": 1.0}
#: The logits-mode fields of the README entry point (delta, lam, eta, n).
_ENTRY_POINT = {"threshold": 0.3, "kl_weight": 0.05, "lr": 0.1, "steps": 3}


def _logits(threshold: float, kl_weight: float, lr: float, steps: int) -> dict:
    return {
        "mode": "logits",
        "threshold": threshold,
        "kl_weight": kl_weight,
        "lr": lr,
        "steps": steps,
        **_ALGORITHM_1,
    }


#: Every preset, every field. ``scicode`` is the one preset that is not a single
#: published point: the authors swept it (:data:`SCICODE_SWEEP`).
PUBLISHED: dict[str, dict] = {
    # README entry point (general default).
    "default": _logits(0.3, 0.05, 0.1, 3),
    # Fallback defaults inside the authors' sampler.
    "sampler": _logits(0.3, 0.001, 0.1, 5),
    # MATH500, AMC, AIME runs.
    "math": _logits(0.1, 0.001, 0.1, 3),
    # LeetCode runs: the same row of the authors' table as MATH500/AMC/AIME.
    "code": _logits(0.1, 0.001, 0.1, 3),
    # Minerva, OlympiadBench (Qwen-Math harness).
    "qwen-math": _logits(0.3, 0.01, 0.05, 3),
    # UGPhysics.
    "physics": _logits(0.1, 0.0, 0.1, 5),
    # SciCode: a point inside the authors' sweep (em-inf's choice, checked against
    # the sweep's ranges in tests/test_config.py).
    "scicode": _logits(0.1, 0.001, 0.05, 5),
    # Algorithm 1 with the authors' defaults; its logits-mode fields are the entry
    # point's (unused in temperature mode).
    "adaptive-temperature": {
        **_ENTRY_POINT,
        "mode": "temperature",
        "threshold": 1e-5,
        **_ALGORITHM_1,
    },
}

#: The authors' SciCode sweep, (low, high) inclusive per field.
SCICODE_SWEEP = {
    "threshold": (0.05, 0.5),
    "kl_weight": (0.001, 0.01),
    "lr": (0.01, 0.1),
    "steps": (3, 5),
}
