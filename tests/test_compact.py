import time

import pytest
import torch
from torch import nn

from gblr import GBLRLinear, compact_kernel
from gblr.compact import (
    EXECUTIONS,
    MOST_CALLS_PER_SAMPLE,
    SAMPLE_SECONDS,
    CompactGBLRLinear,
    _grouped_available,
    _median_seconds,
    compact,
)
from gblr.fit import relative_error

# The Triton kernels run here in Triton's interpreter when Triton is installed (tests/conftest.py).
RUNNABLE = tuple(e for e in EXECUTIONS if (e != "kernel" or compact_kernel.available(torch.device("cpu")))
                 and (e != "grouped" or _grouped_available(torch.device("cpu"), torch.float32)))


def random_structure(layer, seed=0, max_width=0.6):
    gen = torch.Generator().manual_seed(seed)
    k = layer.num_components
    with torch.no_grad():
        layer.out_widths.copy_(torch.rand(k, generator=gen) * max_width)
        layer.in_widths.copy_(torch.rand(k, generator=gen) * max_width)
        layer.out_starts.copy_(torch.rand(k, generator=gen))  # many intervals wrap around
        layer.in_starts.copy_(torch.rand(k, generator=gen))
    return layer.eval()


@pytest.mark.parametrize(
    "options",
    [
        {"rank": 1},
        {"rank": 4, "tile": 8},
        {"rank": 1, "sigma": 20.0},  # Gaudi tails that survive the hard mask
        {"rank": 2, "bias": False},
    ],
)
def test_compact_computes_what_the_eval_layer_computes(options):
    torch.manual_seed(0)
    layer = random_structure(GBLRLinear(96, 80, num_components=24, **options))
    fast = CompactGBLRLinear(layer, calibrate=False)
    x = torch.randn(3, 7, 96)
    expected = layer(x)
    for execution in RUNNABLE:
        assert relative_error(fast.run(x, execution), expected) <= 1e-5, execution
    assert relative_error(fast(x), expected) <= 1e-5


def test_factored_inner_size_is_padded_with_zero_components():
    # 16-bit GPU matmuls need 16-byte leading dimensions for their fast kernels: 5 components -> 8
    layer = random_structure(GBLRLinear(40, 24, num_components=5), max_width=0.9)
    fast = CompactGBLRLinear(layer, calibrate=False)
    assert fast.in_factor.shape == (8, 40) and fast.out_factor.shape == (24, 8)
    assert fast.in_factor[5:].abs().sum() == 0 and fast.out_factor[:, 5:].abs().sum() == 0
    x = torch.randn(6, 40)
    assert relative_error(fast.run(x, "factored"), layer(x)) <= 1e-5


def test_identical_intervals_merge_and_small_blocks_go_dense():
    u, v = torch.randn(3, 1, 32, dtype=torch.float64), torch.randn(3, 1, 32, dtype=torch.float64)
    layer = GBLRLinear.from_intervals([(4, 16), (4, 16), (30, 2)], [(28, 8), (28, 8), (0, 2)], u, v).eval()
    fast = CompactGBLRLinear(layer, align=1, calibrate=False)
    kinds = sorted((g.second is None, g.first.shape[0], g.rows, g.cols) for g in fast.groups)
    # the two equal components are one rank-2 block 16x8; the 2x2 block is cheaper dense
    assert kinds == [(False, 1, 16, 8), (True, 1, 2, 2)]
    assert fast.macs_per_token() == 2 * (16 + 8) + 2 * 2
    assert len(fast.slices) == 2 and fast.execution_macs("slices") == 2 * (16 + 8) + 2 * 2  # unpadded
    x = torch.randn(5, 32, dtype=torch.float64)
    for execution in ("blocks", "slices"):  # the 8 columns from 28 wrap around
        assert torch.allclose(fast.run(x, execution), layer(x), atol=1e-12)


def test_uncalibrated_choice_follows_counted_macs():
    layer = random_structure(GBLRLinear(64, 64, num_components=64), max_width=0.05)
    fast = CompactGBLRLinear(layer, calibrate=False)
    assert fast.choose(100) == min(EXECUTIONS, key=fast.execution_macs)


def test_calibration_plans_every_token_count():
    layer = random_structure(GBLRLinear(64, 64, num_components=8))
    fast = CompactGBLRLinear(layer, calibrate=False)
    timings = fast.calibrate(token_counts=(1, 32), repeats=2)
    assert set(timings) == {1, 32} and set(fast.plan) == {1, 32}
    assert all(set(t) == set(fast.executions()) for t in timings.values())
    assert "kernel" not in fast.executions()  # on the CPU only Triton's interpreter could run it
    assert fast.choose(1) == fast.plan[1] and fast.choose(50) == fast.plan[32]
    assert set(fast.plan) == {1, 32}  # 50 is within a factor 2 of a calibrated count


def test_new_token_counts_and_moves_are_timed_on_first_use():
    layer = random_structure(GBLRLinear(64, 64, num_components=8))
    fast = CompactGBLRLinear(layer, calibrate=False)
    fast.calibrate(token_counts=(1, 32), repeats=1)
    fast.choose(1000)
    assert set(fast.plan) == {1, 32}  # not calibrating on use
    fast.calibrate_on_use = True
    assert fast.choose(2000) == fast.plan[2000]
    fast.to(torch.float64)  # timings of another dtype do not carry over
    assert fast.plan == {}
    fast(torch.randn(3, 5, 64, dtype=torch.float64))
    assert set(fast.plan) == {15}


def test_compact_model_same_predictions():
    torch.manual_seed(0)
    model = nn.Sequential(GBLRLinear(32, 64), nn.GELU(), GBLRLinear(64, 10), nn.LogSoftmax(-1))
    random_structure(model[0], 1)
    random_structure(model[2], 2)
    model.eval()
    fast = compact(model, calibrate=False)
    assert isinstance(fast[0], CompactGBLRLinear) and isinstance(model[0], GBLRLinear)
    x = torch.randn(50, 32)
    assert torch.equal(fast(x).argmax(-1), model(x).argmax(-1))
    assert relative_error(fast(x), model(x)) <= 1e-5


def test_torch_compile_traces_a_compact_model_whole():
    """Choosing the execution for a token count is traced (no graph break); a count far from every
    calibrated one takes the nearest plan instead of being timed inside the compiled region."""
    torch.manual_seed(0)
    model = nn.Sequential(GBLRLinear(32, 64, num_components=8), nn.GELU(), GBLRLinear(64, 16, num_components=8))
    random_structure(model[0], 1)
    random_structure(model[2], 2)
    fast = compact(model.eval(), calibrate=False)
    for layer in (fast[0], fast[2]):
        layer.calibrate((1, 32), repeats=1)
        layer.calibrate_on_use = True
    plans = [dict(fast[0].plan), dict(fast[2].plan)]
    compiled = torch.compile(fast, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        for shape in ((4, 8, 32), (1, 32), (300, 32)):
            x = torch.randn(shape)
            assert relative_error(compiled(x), model(x)) <= 1e-5
    assert [fast[0].plan, fast[2].plan] == plans  # 300 tokens: not timed while compiling


def test_compact_rejects_other_layers():
    with pytest.raises(ValueError, match="GBLRLinear"):
        CompactGBLRLinear(nn.Linear(4, 4))


def test_compact_follows_dtype_moves_and_empty_structures():
    layer = random_structure(GBLRLinear(48, 40, num_components=6, rank=2))
    fast = CompactGBLRLinear(layer, calibrate=False).to(torch.float64)
    x = torch.randn(4, 48, dtype=torch.float64)
    for execution in ("blocks", "slices"):
        out = fast.run(x, execution)
        assert out.dtype == torch.float64
        assert relative_error(out, layer.to(torch.float64)(x)) <= 1e-6  # factors were rounded to float32 first
    with torch.no_grad():
        layer.out_widths.zero_()
    empty = CompactGBLRLinear(layer, calibrate=False)
    for execution in empty.executions():
        assert torch.allclose(empty.run(x, execution), layer.bias.expand(4, 40))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CI has no GPU)")
def test_compact_on_cuda_matches_the_eval_layer():
    torch.manual_seed(0)
    layer = GBLRLinear(96, 80, rank=4, tile=8, device="cuda")
    with torch.no_grad():
        layer.out_widths.uniform_(0.2, 0.6)
        layer.in_widths.uniform_(0.2, 0.6)
    layer.eval()
    fast = CompactGBLRLinear(layer)
    assert all(g.first.is_cuda and g.out_index.is_cuda for g in fast.groups)
    x = torch.randn(37, 96, device="cuda")
    with torch.no_grad():
        reference = layer(x)
        for execution in ("dense", "factored", "blocks", "slices", "grouped"):
            if execution not in fast.executions():
                continue  # grouped matmuls exist on some GPUs only
            out = fast.run(x, execution)
            assert out.is_cuda
            assert relative_error(out, reference) < 1e-5, execution
        half = CompactGBLRLinear(layer.to(torch.bfloat16), calibrate=False)
        for execution in half.executions():
            out = half.run(x.to(torch.bfloat16), execution).float()
            assert relative_error(out, reference) < 2e-2, execution


def test_an_execution_is_ruled_out_only_where_overheads_do_not_hide_its_cost(monkeypatch):
    # 16 x 16: dense at 2,048 tokens must stay far below HOPELESS_DENSE_SECONDS on a busy CPU
    layer = random_structure(GBLRLinear(16, 16, num_components=4))
    fast = CompactGBLRLinear(layer, calibrate=False)
    slow, forward = fast._slices, fast._forward

    def slices_with_overhead(x2):
        time.sleep(2e-3)  # like thousands of kernel launches: hopeless at any size
        return slow(x2)

    monkeypatch.setattr(fast, "_slices", slices_with_overhead)
    fast.calibrate((2048,), repeats=1)  # dense takes microseconds: a GPU's launch-bound regime
    assert not fast._hopeless

    def dense_past_launch_overheads(x, execution):
        if execution == "dense":
            time.sleep(2e-4)
        return forward(x, execution)

    monkeypatch.setattr(fast, "_forward", dense_past_launch_overheads)
    fast.calibrate((1, 64), repeats=1)
    assert not fast._hopeless  # few tokens: timed again at larger counts
    fast.calibrate((2048,), repeats=1)
    assert "slices" in fast._hopeless
    assert fast.calibrate((4096,), repeats=1)[4096]["slices"] == float("inf")


def test_calibration_times_runs_of_calls_between_synchronisations():
    """A quick call is timed in runs of MOST_CALLS_PER_SAMPLE (on a GPU they queue as in a model), a slow
    one alone; the time is per call either way."""
    events = []
    quick = lambda: events.append("call")  # noqa: E731
    assert _median_seconds(quick, 3, lambda: events.append("sync")) < 1e-4
    runs = "".join("c" if e == "call" else "|" for e in events).split("|")
    assert [len(r) for r in runs if r] == [1] + [MOST_CALLS_PER_SAMPLE] * 3  # the first call sizes the runs
    events.clear()
    slow = lambda: time.sleep(2 * SAMPLE_SECONDS) or events.append("call")  # noqa: E731
    assert _median_seconds(slow, 2, lambda: events.append("sync")) >= 2 * SAMPLE_SECONDS
    assert events == ["sync", "call", "sync"] * 3


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("execution", ["dense", "factored"])
def test_forward_on_the_dense_and_factored_plans_follows_moves_and_loads_and_names_a_wrong_shape(bias, execution):
    layer = random_structure(GBLRLinear(24, 16, num_components=4, bias=bias))
    fast = CompactGBLRLinear(layer, calibrate=False)
    fast._choices = {3: execution, 6: execution}  # forward's fast path: no nn.Module lookup, no reshape
    x = torch.randn(3, 24)
    assert relative_error(fast(x), layer(x)) <= 1e-6
    batched = torch.randn(2, 3, 24)
    assert fast(batched).shape == (2, 3, 16) and relative_error(fast(batched), layer(batched)) <= 1e-6
    other = CompactGBLRLinear(random_structure(GBLRLinear(24, 16, num_components=4, bias=bias), seed=1), calibrate=False)
    fast.load_state_dict(other.state_dict())
    assert relative_error(fast(x), other.run(x, "dense")) <= 1e-6
    fast.to(torch.float64)._choices = {3: execution}
    assert fast(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match=r"in_features=24, got shape \(9, 8\)"):
        fast(torch.randn(9, 8).double())  # 72 values: "3 tokens" to the plan, so the fast path meets it
    with pytest.raises(RuntimeError):  # not a shape problem: torch's own error
        fast(x)  # float32 input, float64 weight


def test_an_execution_that_fails_on_this_machine_is_left_out_not_fatal(monkeypatch):
    layer = random_structure(GBLRLinear(32, 32, num_components=4))
    fast = CompactGBLRLinear(layer, calibrate=False)

    def cannot_compile(x2):  # like a Triton kernel this GPU cannot build for this dtype
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(fast, "_slices", cannot_compile)
    with pytest.warns(UserWarning, match="execution 'slices' failed on cpu .* not used there"):
        timings = fast.calibrate((4, 64), repeats=1)
    assert timings[4]["slices"] == timings[64]["slices"] == float("inf")
    assert "slices" in fast._hopeless and "slices" not in fast.plan.values()
    x = torch.randn(64, 32)
    assert relative_error(fast(x), layer(x)) <= 1e-5
    fast.plan.clear()  # uncalibrated, the cheapest by counted MACs among those that run
    fast._choices.clear()
    assert fast.choose(64) != "slices"
    monkeypatch.setattr(fast, "_dense", cannot_compile)
    with pytest.raises(RuntimeError, match="out of resources"):  # without dense there is nothing to fall back on
        fast.calibrate((4,), repeats=1)
