"""Large CPU results on reused memory (em_inf.reused_results): a result the caller let
go lends its memory to the next of its size, whatever it left there, and memory
still reachable from any tensor or array is never lent."""

from __future__ import annotations

import concurrent.futures
import gc

import pytest
import torch

from em_inf import functional, reused_results
from tests.inputs import mask_randomly, random_logits

QWEN_VOCAB = 151_936
LOGITS = dict(threshold=0.3, kl_weight=0.05, lr=0.1, steps=3)
TEMPERATURE = dict(threshold=1e-5, alpha=0.85, t_min=0.01, t_max=1.0)


@pytest.fixture(autouse=True, params=["cpu", "torch"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on the compiled CPU kernels and on the eager PyTorch path;
    no block is held before or after it."""
    monkeypatch.setenv("EM_INF_BACKEND", request.param)
    gc.collect()  # results in reference cycles elsewhere would come back mid-test
    reused_results.release()
    yield request.param
    reused_results.release()


def run(mode: str, logits: torch.Tensor) -> torch.Tensor:
    if mode == "logits":
        return functional.em_inf(logits, **LOGITS)
    return functional.adaptive_temperature(logits, **TEMPERATURE)


def reuse_above(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    monkeypatch.setattr(reused_results, "REUSED_ABOVE_BYTES", nbytes)


def fresh_result(mode: str, logits: torch.Tensor) -> torch.Tensor:
    """``run`` on memory of its own (no block reused)."""
    reused_results.release()
    with pytest.MonkeyPatch.context() as patch:
        reuse_above(patch, 1 << 62)
        return run(mode, logits)


@pytest.mark.parametrize("mode", ["logits", "temperature"])
def test_a_result_let_go_lends_its_memory_to_the_next_whatever_it_left_there(
    mode, monkeypatch
):
    rows, vocab = 6, 3_001
    first_logits = random_logits(rows, vocab)
    second_logits = mask_randomly(random_logits(rows, vocab, scale=2.0), 0.3)
    second_logits[1, 5] = 80.0  # a row below the threshold: returned as it came
    expected = fresh_result(mode, second_logits)
    reuse_above(monkeypatch, 4 * rows * vocab - 1)

    first = run(mode, first_logits)
    address = first.data_ptr()
    first.fill_(torch.nan)  # what a caller may leave in a result
    del first
    assert reused_results.held_bytes() == 4 * rows * vocab
    second = run(mode, second_logits)
    assert second.data_ptr() == address
    assert reused_results.held_bytes() == 0
    assert torch.equal(second, expected)


@pytest.mark.parametrize(
    "keep",
    [
        lambda out: out[2:4],
        lambda out: out.t(),
        lambda out: out.numpy(),
        lambda out: out.view(-1)[7:],
    ],
    ids=["rows", "transposed", "numpy", "flat-view"],
)
def test_memory_still_reachable_is_not_lent(keep, monkeypatch):
    logits = random_logits(4, 2_000)
    reuse_above(monkeypatch, 0)
    first = run("logits", logits)
    address, before = first.data_ptr(), first.clone()
    kept = keep(first)
    del first
    assert reused_results.held_bytes() == 0
    second = run("logits", random_logits(4, 2_000))
    assert second.data_ptr() != address
    assert torch.equal(torch.as_tensor(kept), torch.as_tensor(keep(before)))
    del kept  # now nothing reaches the first result's memory
    assert reused_results.held_bytes() == 4 * 4 * 2_000
    third_logits = random_logits(4, 2_000)
    third = run("logits", third_logits)
    assert third.data_ptr() == address
    assert torch.equal(third, fresh_result("logits", third_logits))


def test_at_most_one_block_is_held_and_only_for_its_size(monkeypatch):
    reuse_above(monkeypatch, 0)
    results = [run("logits", random_logits(3, 1_000)) for _ in range(3)]
    del results
    assert reused_results.held_bytes() == 4 * 3 * 1_000
    other = run("logits", random_logits(5, 1_000))  # another size: freed, not used
    assert reused_results.held_bytes() == 0
    del other
    assert reused_results.held_bytes() == 4 * 5 * 1_000
    reused_results.release()
    assert reused_results.held_bytes() == 0


@pytest.mark.parametrize("above", [-1, 0], ids=["just-above", "at-the-threshold"])
def test_only_results_above_the_threshold_use_blocks(above, monkeypatch):
    rows, vocab = 3, 1_000
    reuse_above(monkeypatch, 4 * rows * vocab + above)
    out = run("logits", random_logits(rows, vocab))
    # A block's result is a numpy array's memory, whose storage cannot grow.
    assert out.untyped_storage().resizable() == (above == 0)
    del out
    assert reused_results.held_bytes() == (4 * rows * vocab if above else 0)


def test_results_freed_on_other_threads_are_each_right(monkeypatch, seed):
    inputs = [random_logits(4, 2_500) for _ in range(6)]
    expected = [fresh_result("logits", logits) for logits in inputs]
    reuse_above(monkeypatch, 0)

    def worker(start: int) -> list[int]:
        wrong = []
        for call in range(12):
            which = (start + call) % len(inputs)
            if not torch.equal(run("logits", inputs[which]), expected[which]):
                wrong.append(which)
        return wrong

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        wrong = [i for found in pool.map(worker, range(4)) for i in found]
    assert not wrong, f"seed {seed}: inputs {wrong} came back wrong"


@pytest.mark.parametrize("rows", [8, 64])
def test_a_qwen_sized_batch_reuses_its_memory_by_default(rows, cpu_path):
    # 8 rows (4.9 MB) come from malloc's heap, which may give them back when freed;
    # 64 (37 MiB) are mapped afresh for every allocation.
    if cpu_path != "cpu":
        pytest.skip("one shape at full size is enough; the eager path takes seconds")
    logits = random_logits(rows, QWEN_VOCAB)
    assert 4 * logits.numel() > reused_results.REUSED_ABOVE_BYTES
    expected = fresh_result("logits", logits)
    first = run("logits", random_logits(rows, QWEN_VOCAB))
    address = first.data_ptr()
    del first
    second = run("logits", logits)
    assert second.data_ptr() == address
    assert torch.equal(second, expected)
