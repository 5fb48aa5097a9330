"""The Triton execution of compact layers against the layer itself: on CUDA when there is one, else in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_compact import random_structure

from gblr import GBLRLinear
from gblr import compact_kernel, stand_in_gpu
from gblr.compact import CompactGBLRLinear
from gblr.fit import relative_error

pytestmark = pytest.mark.skipif(compact_kernel.triton is None, reason="needs Triton (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tests that run the kernels: on the CPU, Triton's interpreter must be able to (Triton >= 3.7 or NumPy < 2.4).
_why_not = compact_kernel.unavailable_reason(torch.device(DEVICE))
runs_kernels = pytest.mark.skipif(_why_not is not None, reason=f"the kernels cannot run here: {_why_not}")


@runs_kernels
@pytest.mark.parametrize(
    "options",
    [
        {"rank": 1},
        {"rank": 4, "tile": 8},  # low-rank and dense blocks, intervals wrapping around
        {"rank": 2, "bias": False},
        {"rank": 24, "num_components": 3},  # few wide blocks: several rank tiles per block
        {"rank": 16, "tile": 16, "num_components": 6},  # every offset a multiple of 16: aligned loads
    ],
)
@pytest.mark.parametrize("tokens", [1, 37, 130])
def test_kernel_computes_what_the_layer_computes(options, tokens):
    torch.manual_seed(0)
    options = {"num_components": 24, **options}
    layer = random_structure(GBLRLinear(96, 80, **options)).to(DEVICE)
    fast = CompactGBLRLinear(layer, calibrate=False)
    assert "kernel" in fast.executions() or DEVICE == "cpu"  # calibration considers it on CUDA only
    x = torch.randn(tokens, 96, device=DEVICE)
    with torch.no_grad():
        assert relative_error(fast.run(x, "kernel"), layer(x)) <= 1e-5
    if options.get("tile") == 16:  # blocks on 16-column tiles: every gather reads aligned runs of 16
        assert fast._kernel_layout.plan("expand", 64, 32).runs == (True, True)


@runs_kernels
def test_forward_through_the_kernel_keeps_the_leading_shape():
    """The forward hands the kernels a batched input as it is (no reshape: host time per call), a
    non-contiguous one made contiguous, and falls back to the differentiable slices for a backward."""
    torch.manual_seed(1)
    layer = random_structure(GBLRLinear(96, 80, num_components=8, rank=4)).to(DEVICE)
    fast = CompactGBLRLinear(layer, calibrate=False)
    fast.plan = {1: "kernel"}
    for x in (torch.randn(3, 5, 96, device=DEVICE), torch.randn(96, 7, 2, device=DEVICE).permute(2, 1, 0)):
        with torch.no_grad():
            out = fast(x)
            assert out.shape == (*x.shape[:-1], 80) and relative_error(out, layer(x)) <= 1e-5
    x = torch.randn(2, 4, 96, device=DEVICE, requires_grad=True)
    fast(x).sum().backward()
    assert relative_error(x.grad, torch.autograd.grad(layer(x).sum(), x)[0]) <= 1e-5
    with pytest.raises(ValueError, match="in_features=96"):
        fast(torch.randn(2, 95, device=DEVICE))


@runs_kernels
def test_both_kinds_of_blocks_and_every_tile_shape():
    u, v = torch.randn(3, 1, 40, dtype=torch.float64), torch.randn(3, 1, 40, dtype=torch.float64)
    # one rank-2 block 24 x 16 wrapping on both sides, one 2 x 2 block (dense), one full-height block
    layer = GBLRLinear.from_intervals([(30, 24), (30, 24), (3, 2)], [(36, 16), (36, 16), (0, 2)], u, v).float().eval()
    fast = CompactGBLRLinear(layer, calibrate=False).to(DEVICE)
    kinds = sorted(p.second is None for p in fast.slices)
    assert kinds == [False, True]
    x = torch.randn(70, 40, device=DEVICE)
    expected = layer.to(DEVICE)(x).detach()
    layout = compact_kernel.KernelLayout([(p.in_parts, p.out_parts, p.first, p.second) for p in fast.slices],
                                         40, 40, x.device, x.dtype)
    for tiles in (compact_kernel.Tiles(64, 16, 64, 32, 16), compact_kernel.Tiles(16, 32, 16, 16, 32), compact_kernel.Tiles(32, 16, 32, 64, 64)):
        assert relative_error(layout.run(x, fast.bias, tiles), expected) <= 1e-5, tiles
    assert not layout.plan("expand", 64, 16).runs[1]  # 40 inputs: no aligned runs of 16 in x


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_in_half_precision(dtype):
    torch.manual_seed(1)
    layer = random_structure(GBLRLinear(64, 96, num_components=6, rank=8, tile=8)).to(DEVICE)
    x = torch.randn(50, 64, device=DEVICE)
    with torch.no_grad():
        expected = layer(x)
    fast = CompactGBLRLinear(layer, calibrate=False).to(dtype)
    out = fast.run(x.to(dtype), "kernel")
    assert out.dtype == dtype
    assert relative_error(out, expected) <= 2e-2


@runs_kernels
def test_empty_structure_gives_the_bias():
    layer = random_structure(GBLRLinear(48, 40, num_components=6, rank=2)).to(DEVICE)
    with torch.no_grad():
        layer.out_widths.zero_()
    fast = CompactGBLRLinear(layer, calibrate=False)
    x = torch.randn(5, 48, device=DEVICE)
    assert torch.allclose(fast.run(x, "kernel"), layer.bias.detach().expand(5, 40))


def test_kernel_names_why_it_cannot_run(monkeypatch):
    layer = random_structure(GBLRLinear(32, 32, num_components=4))
    fast = CompactGBLRLinear(layer, calibrate=False)
    x = torch.randn(2, 32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "kernel" not in fast.executions()
    with pytest.raises(ValueError, match="cannot run on cpu: the kernels need a CUDA device, or TRITON_INTERPRET=1"):
        fast.run(x, "kernel")
    monkeypatch.setattr(compact_kernel, "triton", None)
    with pytest.raises(ValueError, match=r"Triton is not installed \(pip install triton\)"):
        fast.run(x, "kernel")


def test_the_interpreter_runs_the_kernels_only_with_triton_3_7_or_numpy_before_2_4(monkeypatch):
    import numpy

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    for triton_version, numpy_version, runs in (("3.6.0", "2.4.1", False), ("3.6.0", "2.3.5", True),
                                                ("3.7.0+git0a1b2c", "2.4.1", True), ("3.10.0", "3.0.0rc1", True)):
        monkeypatch.setattr(compact_kernel.triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        assert compact_kernel.available(cpu) == runs, (triton_version, numpy_version)
        reason = compact_kernel.unavailable_reason(cpu)
        assert (reason is None) == runs
        if not runs:
            assert f"Triton {triton_version}'s interpreter" in reason and f"NumPy {numpy_version}" in reason
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not compact_kernel.available(cpu)


@runs_kernels
def test_only_dense_blocks():
    u, v = torch.randn(2, 1, 24, dtype=torch.float64), torch.randn(2, 1, 40, dtype=torch.float64)
    layer = GBLRLinear.from_intervals([(3, 2), (20, 1)], [(38, 2), (5, 1)], u, v).float().eval()  # 2x2 and 1x1: dense
    fast = CompactGBLRLinear(layer, calibrate=False).to(DEVICE)
    assert all(p.second is None for p in fast.slices)
    x = torch.randn(9, 40, device=DEVICE)
    assert relative_error(fast.run(x, "kernel"), layer.to(DEVICE)(x).detach()) <= 1e-5
    assert fast._kernel_layout.z_columns == 0


def test_packing_multiplies_no_zeros_where_blocks_fill_their_tiles():
    torch.manual_seed(2)
    layer = random_structure(GBLRLinear(96, 128, num_components=6, rank=16, tile=16))
    fast = CompactGBLRLinear(layer, calibrate=False)
    layout = compact_kernel.KernelLayout([(p.in_parts, p.out_parts, p.first, p.second) for p in fast.slices],
                                         96, 128, torch.device("cpu"), torch.float32)
    contract = layout.plan("contract", 16, 16)  # one rank-16 block per tile: exactly its input rows
    assert contract.runs[0]
    assert contract.packed.numel() == sum(p.first.numel() for p in fast.slices if p.second is not None)
    expand = layout.plan("expand", 16, 16)  # 16-wide output tiles on 16-row tiles: never a partial tile
    assert expand.packed.numel() == sum((p.first if p.second is None else p.second).numel() for p in fast.slices)
    bounds = expand.bounds.view(-1, 3).tolist()
    for first_row, z_rows, x_rows in bounds:  # rows that read the same column are merged into one
        for start, count in ((first_row, z_rows), (first_row + z_rows, x_rows)):
            columns = expand.index[start : start + count]
            assert len(columns.unique()) == count


def test_runs_of_16():
    assert compact_kernel._runs_of_16(torch.cat([torch.arange(32, 64), torch.arange(0, 16)]))
    assert not compact_kernel._runs_of_16(torch.arange(8, 24))  # a run starting off a multiple of 16
    assert not compact_kernel._runs_of_16(torch.arange(0, 24))  # a partial run
    assert not compact_kernel._runs_of_16(torch.arange(0, 16).flip(0))


def run_compiling(script: str, *args: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter where Triton compiles: under TRITON_INTERPRET=1 (set by conftest.py)
    it only interprets, and the setting holds from the first import of Triton on."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(compact_kernel.__file__).parents[1])
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)


# Compiles both launches of every tile set calibration may time for an sm_90 GPU (no GPU needed) and
# prints what their loads became (run by run_compiling).
SM90_LOADS = """
import json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
import torch
from gblr.compact_kernel import _gathered_matmul_kernel, tile_candidates
dtype = sys.argv[1]
names = ["first_source_ptr", "first_stride", "second_source_ptr", "second_stride", "index_ptr", "packed_ptr",
         "bounds_ptr", "bias_ptr", "out_ptr", "tokens", "out_width"]
types = ["*" + dtype, "i32", "*" + dtype, "i32", "*i32", "*" + dtype, "*i32", "*" + dtype, "*" + dtype, "i32", "i32"]
half = dtype == "bf16"
# what the launcher assumes of torch tensors and of integer arguments that are multiples of 16
attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name not in ("tokens", "bounds_ptr")}
launches = set()
for tokens in (16384, 512):
    for tiles in tile_candidates(torch.bfloat16 if half else torch.float32, tokens, 32):
        launches.add((False, tiles.tokens, tiles.rank, tiles.k, tiles.warps, tiles.stages))  # contract
        launches.add((True, tiles.tokens, tiles.out, tiles.k_out, tiles.warps_out, tiles.stages))  # expand
for launch in sorted(launches):
    has_bias, block_t, block_n, block_k, warps, stages = launch
    constants = {"HAS_BIAS": has_bias, "BLOCK_T": block_t, "BLOCK_N": block_n, "BLOCK_K": block_k,
                 "IEEE": not half, "UPCAST": False, "FIRST_RUNS": True, "SECOND_RUNS": True}
    signature = dict(zip(names, types)) | {name: "constexpr" for name in constants}
    kernel = compile(ASTSource(_gathered_matmul_kernel, signature, constexprs=constants, attrs=attrs),
                     target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    loop = ttgir[ttgir.index("scf.for"):]
    print(json.dumps({
        "launch": launch,
        # "async_wait ... {num = N}" at the top of the reduction loop: copies left in flight while it computes
        "copies_in_flight": int(loop.split("async_wait", 1)[1].split("num = ", 1)[1].split(" ", 1)[0]),
        # "cp.async.cg.shared.global [ dst ], [ src ], BYTES(, src-size);": the bytes each copy moves
        "copy_bytes": sorted({int(line.split("],")[-1].split(",")[0].strip(" ;"), 16) for line in ptx.splitlines()
                              if "cp.async.cg.shared.global" in line}),
        "scalar_loads": ptx.count("ld.global.b16" if half else "ld.global.b32"),
        "async_copies": ttgir.count("async_copy_global_to_local"),
        "shared_bytes": kernel.metadata.shared,
    }))
"""
SM90_SHARED_BYTES = 232448  # the most shared memory one program may use on an H100/H200


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_generated_gpu_code_keeps_vector_loads_and_the_pipeline(dtype):
    """Every tile is fetched with 16-byte asynchronous copies that the software pipeline overlaps with
    the products, for every tile set calibration may time. A mask along the reduction, or a gather
    without its run hints, turns them into one 2- or 4-byte load per element (the first version of these
    kernels did that); too few stages leave nothing in flight (with 3 or 4, every step waits for all its
    copies)."""
    pytest.importorskip("triton.backends.nvidia")
    done = run_compiling(SM90_LOADS, dtype)
    assert done.returncode == 0, done.stderr[-2000:]
    launches = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(launches) >= 6
    for loads in launches:
        assert loads["copy_bytes"] == [16], loads
        assert loads["async_copies"] >= 8, loads  # both operands of both loops, ahead of the loop and in it
        assert loads["scalar_loads"] <= 3, loads  # the tile's three bounds at most
        assert loads["copies_in_flight"] >= 3, loads  # the next step's tiles load while this one multiplies
        assert loads["shared_bytes"] <= SM90_SHARED_BYTES, loads


def test_gathers_read_aligned_runs_unless_that_doubles_the_reads():
    torch.manual_seed(3)
    layer = random_structure(GBLRLinear(96, 128, num_components=24, rank=1))
    fast = CompactGBLRLinear(layer, calibrate=False)
    layout = compact_kernel.KernelLayout([(p.in_parts, p.out_parts, p.first, p.second) for p in fast.slices],
                                         96, 128, torch.device("cpu"), torch.float32)
    assert layout.plan("contract", 16, 16).runs[0]  # wide input windows: whole runs cost little more
    expand = layout.plan("expand", 32, 16)
    assert not expand.runs[0]  # one z column per small-rank block: whole runs would read 16x as much


@runs_kernels
def test_calibration_keeps_the_fastest_tiles_and_skips_those_that_cannot_build(monkeypatch):
    layer = random_structure(GBLRLinear(48, 64, num_components=6, rank=4)).to(DEVICE)
    fast = CompactGBLRLinear(layer, calibrate=False)
    cannot_build, slow, quick = (compact_kernel.Tiles(16, 16, 16, 16, 16), compact_kernel.Tiles(32, 16, 32, 16, 16),
                                 compact_kernel.Tiles(16, 16, 32, 16, 16))
    run, used = compact_kernel.KernelLayout.run, []

    def run_with(layout, x2, bias, tiles=None):
        tiles = tiles or layout.tiles_for(x2.shape[0])
        if tiles == cannot_build:
            raise RuntimeError("out of resources: shared memory")  # as Triton says for a kernel too big
        used.append(tiles)
        return run(layout, x2, bias, tiles)

    def seconds(call, count, synchronize):  # the interpreter's times say nothing: a GPU's, made up
        used.clear()
        call()
        return {slow: 3e-4, quick: 1e-4}[used[-1]] if used else 2e-4  # dense: 2e-4

    monkeypatch.setattr(compact_kernel.KernelLayout, "run", run_with)
    monkeypatch.setattr(sys.modules["gblr.compact"], "_median_seconds", seconds)  # (gblr.compact: the function)
    monkeypatch.setattr(compact_kernel, "tile_candidates", lambda dtype, tokens, rank_tile: (cannot_build, slow, quick))
    monkeypatch.setattr(CompactGBLRLinear, "executions", lambda self: ("dense", "kernel"))  # as on a GPU
    assert fast.calibrate((40,), repeats=1)[40] == {"dense": 2e-4, "kernel": 1e-4}
    assert fast.plan == {40: "kernel"}
    layout = fast._kernel_layout
    assert layout.tiles_for(40) == layout.tiles_for(70) == quick  # within a factor 2 of the measured count
    assert layout.tiles_for(90) == compact_kernel.default_tiles(torch.float32, 90, layout.rank_tile)
    x = torch.randn(40, 48, device=DEVICE)
    assert relative_error(fast(x), layer(x)) <= 1e-5 and used[-1] == quick

    monkeypatch.setattr(compact_kernel, "tile_candidates", lambda dtype, tokens, rank_tile: (cannot_build,))
    with pytest.warns(UserWarning, match="execution 'kernel' failed"):  # none builds: the layer goes on without it
        assert fast.calibrate((300,), repeats=1)[300]["kernel"] == float("inf")
    assert "kernel" in fast._hopeless and fast.plan[300] == "dense"


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_candidate_tile_set_computes_the_layer(dtype):
    torch.manual_seed(4)
    layer = random_structure(GBLRLinear(64, 288, num_components=6, rank=8, tile=16)).to(DEVICE)  # a partial 256 tile
    x = torch.randn(130, 64, device=DEVICE)
    with torch.no_grad():
        expected = layer(x)
    fast = CompactGBLRLinear(layer, calibrate=False).to(dtype)
    layout = fast._layout()
    candidates = {t for tokens in (130, 4096) for t in compact_kernel.tile_candidates(dtype, tokens, layout.rank_tile)}
    for tiles in candidates:
        assert relative_error(layout.run(x.to(dtype), fast.bias, tiles), expected) <= (1e-5 if dtype == torch.float32 else 2e-2), tiles


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CI has no GPU)")
def test_every_execution_and_the_calibrated_forward_replay_from_a_cuda_graph():
    torch.manual_seed(5)
    layer = random_structure(GBLRLinear(96, 80, num_components=6, rank=8, tile=16)).cuda()
    fast = CompactGBLRLinear(layer)
    x = torch.randn(64, 96, device="cuda")
    calls = {e: (lambda e=e: fast.run(x, e)) for e in fast.executions()} | {"forward": lambda: fast(x)}
    with torch.no_grad():
        for name, call in calls.items():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: compiles, packs and (forward) calibrates 64 tokens
                call()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                out = call()
            x.copy_(torch.randn_like(x))  # a replay reads the captured input's memory
            graph.replay()
            assert relative_error(out, layer(x)) <= 1e-5, name


def test_torch_compile_traces_the_python_around_the_kernels(monkeypatch):
    """With the launch itself replaced (it needs dynamo's Triton support, i.e. a GPU: the CUDA test below):
    a compiled call that needs the blocks packed first still runs (dynamo breaks the graph at the packing,
    data-dependent host work, and runs it eagerly); once packed, as calibration leaves a layer, a new token
    count traces whole."""
    torch._dynamo.reset()
    monkeypatch.setattr(compact_kernel, "_launch", lambda kernels, grid, args, constants, warps, stages: args[8].fill_(1.0))
    layer = random_structure(GBLRLinear(96, 80, num_components=6, rank=8, tile=16)).to(DEVICE)
    fast = CompactGBLRLinear(layer, calibrate=False)
    fast.plan = {1: "kernel"}
    with torch.no_grad():
        packs_first = torch.compile(fast, backend="aot_eager")
        assert torch.equal(packs_first(torch.randn(4, 50, 96, device=DEVICE)), torch.ones(4, 50, 80, device=DEVICE))
        whole = torch.compile(fast, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
        assert torch.equal(whole(torch.randn(300, 96, device=DEVICE)), torch.ones(300, 80, device=DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CI has no GPU)")
def test_torch_compile_traces_the_kernel_path_whole():
    torch.manual_seed(7)
    layer = random_structure(GBLRLinear(96, 80, num_components=6, rank=8, tile=16)).cuda()
    fast = CompactGBLRLinear(layer, calibrate=False)
    fast.plan = {1: "kernel"}
    x = torch.randn(4, 50, 96, device="cuda")
    with torch.no_grad():
        fast(x[0])  # packs the blocks, as calibration does
        compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
        assert relative_error(compiled(x), layer(x)) <= 1e-5


# Triton's launch path on a stand-in GPU whose launcher only records what it is given (no GPU needed).
LAUNCH_PROTOCOL = """
import json
import torch
import triton
from gblr import compact_kernel, stand_in_gpu

vary = False
def write_output(args):  # the same each time: the direct launch's check passes; `vary`: a different one
    args[8].fill_(len(launched) if vary else 1.0)

try:
    launched = stand_in_gpu.install(write_output)
except Exception as error:  # a Triton whose driver interface the stand-in does not know
    raise SystemExit(f"STAND-IN UNAVAILABLE: {error!r}")
source = torch.randn(320, 32)
index, packed, bounds = torch.arange(32, dtype=torch.int32), torch.randn(32, 16), torch.tensor([0, 32, 0], dtype=torch.int32)
out = torch.empty(320, 16)
kernels = {}
def launch(first, tokens):
    compact_kernel._launch(kernels, (1, -(-tokens // 64), 1), (first, 32, first, 32, index, packed, bounds, out, out, tokens, 16),
                           (False, 64, 16, 32, True, False, True, False), 4, 5)
misaligned = source.view(-1)[1:].as_strided((63, 32), (32, 1))
for first, tokens in ((source, 64), (source, 64), (misaligned, 63), (source, 300)):
    launch(first, tokens)
kept = len(kernels)
profiled = []  # a profiler's launch hook gets every launch's metadata: Triton's own path while it listens
triton.knobs.runtime.launch_enter_hook.add(profiled.append)
launch(source, 64)
triton.knobs.runtime.launch_enter_hook.remove(profiled.append)
hooked = launched[-1]
vary, before = True, len(launched)  # a direct launch that writes something else
kernels.clear()
launch(source, 64)
launch(source, 64)
print(json.dumps({"launched": launched[:before - 1], "kept": kept, "after_a_failed_check": len(launched) - before,
                  "disabled": not compact_kernel._direct_launch, "hooked": hooked, "profiled": len(profiled)}))
"""


def test_direct_launches_pass_what_tritons_own_launch_passes():
    """After the first call, the compiled kernel is launched directly (Triton's launch re-binds every
    argument, ~10 us of host time per launch): the launcher must get exactly what Triton gives it."""
    pytest.importorskip("triton.backends.nvidia")
    done = run_compiling(LAUNCH_PROTOCOL)
    if "STAND-IN UNAVAILABLE" in done.stderr:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    tritons, check, direct, misaligned, misaligned_check, many, many_check = result["launched"]
    # the second call: launched directly, the same arguments but no launch metadata (only hooks read it)
    metadata = stand_in_gpu.LAUNCHER_PREFIX - 3
    assert [i for i, (a, b) in enumerate(zip(tritons, direct)) if a != b] == [metadata]
    assert direct[metadata] is None and tritons[metadata] is not None
    assert result["hooked"] == tritons and result["profiled"] == 1  # a profiler listening: Triton's launch
    output = stand_in_gpu.LAUNCHER_PREFIX + 8
    assert [i for i, (a, b) in enumerate(zip(tritons, check)) if a != b] == [metadata, output]  # the check: direct
    # an input off 16-byte alignment (and 63 tokens) is another specialisation: Triton's launch again, then a check
    first = stand_in_gpu.LAUNCHER_PREFIX
    assert [i for i, (a, b) in enumerate(zip(tritons, misaligned)) if a != b] == [first, first + 2, first + 9]
    assert misaligned_check[output] != misaligned[output]
    # 300 tokens (another residue): the check runs the first 256 token rows only, 4 tiles of 64 against 5
    assert (many[1], many[first + 9], many_check[1], many_check[first + 9]) == (5, 300, 4, 256)
    assert result["kept"] == 3
    # a direct launch that writes anything else turns direct launches off: Triton's own launch, check, Triton's
    assert result["disabled"] and result["after_a_failed_check"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CI has no GPU)")
def test_on_cuda_kernels_are_launched_directly_after_their_first_call():
    torch.manual_seed(6)
    layer = random_structure(GBLRLinear(96, 80, num_components=6, rank=8, tile=16)).cuda()
    fast = CompactGBLRLinear(layer, calibrate=False)
    x = torch.randn(300, 96, device="cuda")  # the check runs the first 256 rows
    first, second = fast.run(x, "kernel"), fast.run(x, "kernel")  # Triton's launch (and the check), then direct
    assert compact_kernel._direct_launch  # this Triton's compiled kernels took the direct launch
    assert all(step.kernels for step in fast._layout()._steps_for(300, fast._layout().tiles_for(300), fast.bias is not None))
    assert torch.equal(first, second) and relative_error(second, layer(x)) <= 1e-5
