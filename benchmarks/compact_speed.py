"""Inference speed of compact GBLR layers (and low-rank / Monarch at the same cost) vs nn.Linear.

    .venv/bin/python benchmarks/compact_speed.py [--repeats 10] [--shapes 768x3072 ...]     # CPU
    PYTHONPATH=src python3 benchmarks/compact_speed.py --device cuda                          # GPU
    PYTHONPATH=src python3 benchmarks/compact_speed.py --device cuda --graphs --tokens 4096 16384  # GPU time alone

For each shape (in x out), cost, dtype and token count, every variant is timed in the same process as an
``nn.Linear`` of the same shape and dtype (median over ``repeats`` interleaved pairs of the ratio; on a
GPU each sample is a loop of calls between two synchronisations). Reported: time relative to nn.Linear,
speedup, and the fraction of the ideal speedup (speedup x the cost the structure reached, padding
excluded; 1.0 = the time follows the FLOPs exactly). GBLR structures are random intervals shrunk to the cost by the budget projection (as a trained
layer would have): "free" = rank-1 components, K = min(in, out); "hw" = hardware-aware, rank-32
components on 32-row/column tiles. The compact layer runs the execution its calibration chose for that
token count (timed on first use); on a GPU the time of each execution is listed too, and low-rank is also
timed with its rank padded by zero components to a multiple of 8 (the alignment the compact layer's
factored execution has: 16-bit GPU matmuls slow down at ranks off 16 bytes). On a GPU a large copy's
bandwidth is measured first, and each row gets its memory floor (input read and output written once at
that rate): the summary says what fraction of the ideal speed-up that floor leaves within reach.
Writes benchmarks/results/compact_speed.{json,md} (compact_speed_cuda.* on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _results import device_note, graphed, provenance, run_metadata, synchronize, write_results
from torch import nn

from gblr import GBLRLinear
from gblr.compact import FACTOR_ALIGN, CompactGBLRLinear
from gblr.device import resolve_device
from gblr.fit import relative_error
from gblr.learn import project_to_budget
from gblr.structured import LowRankLinear, make_structured

DEFAULTS = {  # tokens, costs, shapes, dtypes
    "cpu": ((1, 64, 1024, 4096), (0.1, 0.3, 0.5), ("768x3072", "3072x768", "384x1536", "576x1536"), ("fp32",)),
    "cuda": ((1, 1024, 4096, 16384, 65536), (0.1, 0.3), ("768x3072", "3072x768"), ("fp32", "bf16", "fp16")),
}
TARGET_TOKENS = 4096  # the speed-up targets apply from here (below, products are bound by launches)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gblr_at_cost(n: int, m: int, cost: float, hardware_aware: bool, seed: int) -> GBLRLinear:
    torch.manual_seed(seed)
    options = {"rank": 32, "tile": 32} if hardware_aware else {"rank": 1}
    layer = GBLRLinear(n, m, width_init="full", **options)
    with torch.no_grad():
        layer.out_widths.uniform_(0.2, 1.0)
        layer.in_widths.uniform_(0.2, 1.0)
        layer.out_starts.uniform_(0.0, 1.0)
        layer.in_starts.uniform_(0.0, 1.0)
    project_to_budget([layer], cost * n * m)
    return layer.eval()


PADDED_LOWRANK = f"lowrank, rank padded to {FACTOR_ALIGN}"


def padded_lowrank(layer: LowRankLinear, multiple: int = FACTOR_ALIGN) -> LowRankLinear:
    """The same function with its rank padded by zero components to a multiple of ``multiple``: the
    alignment the compact form's factored execution gets, given to the baseline too."""
    rank = -(-layer.rank // multiple) * multiple
    padded = LowRankLinear(layer.in_features, layer.out_features, layer.bias is not None, rank=rank)
    with torch.no_grad():
        padded.in_proj.zero_()[: layer.rank] = layer.in_proj
        padded.out_proj.zero_()[:, : layer.rank] = layer.out_proj
        if layer.bias is not None:
            padded.bias.copy_(layer.bias)
    return padded


def compact_layer(layer: GBLRLinear, device: torch.device, dtype: torch.dtype) -> CompactGBLRLinear:
    """The compact form on ``device`` in ``dtype``, timed in that dtype on first use of each token count."""
    fast = CompactGBLRLinear(layer.to(device), calibrate=False).to(dtype)
    fast.calibrate_on_use = True
    return fast


def seconds_per_call(fn, x, device: torch.device, calls: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    synchronize(device)
    return (time.perf_counter() - start) / calls


def copy_bandwidth(device: torch.device, size: int = 2**31, repeats: int = 5) -> float:
    """Bytes per second a device-to-device copy of ``size`` bytes moves (read plus written; median of
    ``repeats``): the ceiling for a layer, which must read its input and write its output at least once."""
    source = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy = lambda _: target.copy_(source)  # noqa: E731
    copy(None)  # warm-up
    return 2 * size / statistics.median(seconds_per_call(copy, None, device, 1) for _ in range(repeats))


def relative_time(fn, dense, x, device: torch.device, repeats: int, graphs: bool = False) -> tuple[float, float]:
    """Median over interleaved repeats of time(fn) / time(dense), and dense's median seconds per call
    (``graphs``: both replayed from CUDA graphs)."""
    for _ in range(2):  # warm-up (and the compact layer's calibration for this token count)
        fn(x), dense(x)
    # On a GPU one call of a small product takes microseconds: time loops of about 2 ms.
    calls = 1 if device.type == "cpu" else max(1, min(200, int(2e-3 / max(seconds_per_call(dense, x, device, 3), 1e-6))))
    if graphs:
        ours, theirs = (graphed(lambda f=f: f(x), calls) for f in (fn, dense))
        time_of = lambda replay: seconds_per_call(lambda _: replay(), x, device, 1) / calls  # noqa: E731 - `calls` calls
    else:
        ours, theirs = fn, dense
        time_of = lambda f: seconds_per_call(f, x, device, calls)  # noqa: E731
    ratios, dense_times = [], []
    for _ in range(repeats):
        mine, dense_seconds = time_of(ours), time_of(theirs)
        ratios.append(mine / dense_seconds)
        dense_times.append(dense_seconds)
    return statistics.median(ratios), statistics.median(dense_times)


def captured_time(fn, dense, x, device: torch.device, repeats: int, graphs: bool) -> tuple[float, float]:
    """relative_time(), or NaNs for a call that a CUDA graph cannot capture (``graphs``)."""
    try:
        return relative_time(fn, dense, x, device, repeats, graphs)
    except RuntimeError as error:
        if not graphs:
            raise
        print(f"not captured in a CUDA graph: {str(error).splitlines()[0][:160]}", flush=True)
        return float("nan"), float("nan")


def target_lines(rows: list[dict]) -> list[str]:
    """The table against the targets: hardware-aware layers at >= 60 % of the ideal speed-up from
    TARGET_TOKENS tokens, and no compact layer below 0.95x of nn.Linear at any token count."""
    lines = [f"Hardware-aware layers from {TARGET_TOKENS:,} tokens, fraction of the ideal speed-up (target 0.6):"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["variant"].startswith("gblr hw") and r["tokens"] >= TARGET_TOKENS:
            groups.setdefault((r["dtype"], r["cost"]), []).append(r)
    for (dtype, cost), group in sorted(groups.items()):
        fractions = [r["fraction_of_ideal"] for r in group]
        line = (f"- {dtype}, cost {cost}: {sum(f >= 0.6 for f in fractions)} of {len(group)} rows meet it, "
                f"median {statistics.median(fractions):.2f}, lowest {min(fractions):.2f}")
        if all("memory_floor_ms" in r for r in group):
            # the most any execution could reach: reading the input and writing the output once
            ceilings = [r["dense_ms"] / r["memory_floor_ms"] * r["reached_cost"] for r in group]
            times = [r["dense_ms"] * r["time_vs_dense"] / r["memory_floor_ms"] for r in group]
            line += (f"; memory traffic allows at most {min(ceilings):.2f}-{max(ceilings):.2f}; the compact layer "
                     f"took {min(times):.1f}-{max(times):.1f}x its memory floor")
        lines.append(line)
    compact = [r for r in rows if r["variant"].startswith("gblr")]
    slow = [r for r in compact if r["speedup"] < 0.95]
    lines += ["", f"Compact layers below 0.95x of `nn.Linear`: {len(slow)} of {len(compact)} rows"
              + (":" if slow else ".")]
    lines += [f"- {r['shape']} {r['dtype']} cost {r['cost']}, {r['tokens']} tokens, {r['variant']}: "
              f"{r['speedup']:.3f}x ({r['execution']})" for r in slow]
    return lines


def write(rows: list[dict], device: torch.device, repeats: int, graphs: bool, bandwidth: float | None) -> None:
    meta = run_metadata(device_note(device), repeats=repeats, cuda_graphs=graphs)
    if bandwidth is not None:
        meta["copy_bandwidth_tb_s"] = round(bandwidth / 1e12, 3)
    gpu = device.type == "cuda"
    lines = [
        f"# Compact GBLR inference speed vs nn.Linear ({device.type}{', CUDA graphs' if graphs else ''})",
        "",
        f"{provenance(meta)} Time relative to `nn.Linear` of the same shape and dtype (median of {repeats} "
        "interleaved repeats"
        + ("; every call of both replayed from a CUDA graph, so host time per call is left out" if graphs else "")
        + "), speedup, and fraction of the ideal speedup (speedup x reached cost, padding excluded). `exec` is the "
        "execution the compact layer's calibration picked for that token count"
        + ("; the last column times every execution it did not rule out (time / nn.Linear). The Triton kernel's "
           "output differs from the dense execution's by at most "
           f"{max((r.get('kernel_relative_error', 0) for r in rows), default=0):.1e} (relative)." if gpu else ".")
        + (f" A device-to-device copy moved {bandwidth / 1e12:.2f} TB/s (read plus written): a layer's memory floor is "
           "its input read and its output written once at that rate." if bandwidth is not None else ""),
        "",
        "| shape (in x out) | dtype | cost | tokens | variant | nn.Linear ms | exec | time / dense | speedup | fraction of ideal |"
        + (" executions |" if gpu else ""),
        "|---|---|---:|---:|---|---:|---|---:|---:|---:|" + ("---|" if gpu else ""),
    ]
    for r in rows:
        line = (f"| {r['shape']} | {r['dtype']} | {r['cost']} | {r['tokens']} | {r['variant']} | {r['dense_ms']:.3f} | "
                f"{r['execution']} | {r['time_vs_dense']:.2f} | {r['speedup']:.2f}x | {r['fraction_of_ideal']:.2f} |")
        if gpu:
            line += " " + ", ".join(f"{e} {t:.2f}" for e, t in r.get("executions_vs_dense", {}).items()) + " |"
        lines.append(line)
    lines += ["", *target_lines(rows)]
    name = "compact_speed" if device.type == "cpu" else f"compact_speed_{device.type}"
    write_results(name + ("_graphs" if graphs else ""), meta, rows, lines)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--shapes", nargs="+")
    parser.add_argument("--costs", type=float, nargs="+")
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--graphs", action="store_true", help="time CUDA graph replays (GPU time alone, no host "
                        "time per call); writes compact_speed_cuda_graphs.*")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.graphs and device.type != "cuda":
        parser.error("--graphs needs a CUDA device")
    tokens_list, costs, shapes, dtypes = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    tokens_list, costs = args.tokens or tokens_list, args.costs or costs
    shapes, dtypes = args.shapes or shapes, args.dtypes or dtypes
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    rows = []
    for shape in shapes:
        n, m = (int(v) for v in shape.split("x"))
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            dense = nn.Linear(n, m).eval().to(device, dtype)
            for cost in costs:
                variants = {
                    "gblr free (r=1)": compact_layer(gblr_at_cost(n, m, cost, False, 0), device, dtype),
                    "gblr hw (r=32, tile=32)": compact_layer(gblr_at_cost(n, m, cost, True, 0), device, dtype),
                    "lowrank": make_structured("lowrank", n, m, cost).eval().to(device, dtype),
                }
                if device.type == "cuda":  # 16-bit matmuls there are slow at ranks off 16 bytes
                    variants[PADDED_LOWRANK] = padded_lowrank(variants["lowrank"]).to(device, dtype)
                if device.type == "cpu":
                    variants["monarch"] = make_structured("monarch", n, m, cost).eval().to(device, dtype)
                for tokens in tokens_list:
                    x = torch.randn(tokens, n, device=device, dtype=dtype)
                    for name, layer in variants.items():
                        ratio, dense_seconds = captured_time(layer, dense, x, device, args.repeats, args.graphs)
                        compact = isinstance(layer, CompactGBLRLinear)
                        reached = layer.execution_macs("kernel") / (n * m) if compact else layer.relative_cost()
                        # padding zeros add FLOPs, not function: the ideal is the unpadded structure's
                        needed = variants["lowrank"].relative_cost() if name == PADDED_LOWRANK else reached
                        row = {
                            "shape": shape, "dtype": dtype_name, "cost": cost, "tokens": tokens, "variant": name,
                            "reached_cost": reached,
                            "execution": layer.choose(tokens) if compact else "-",
                            "dense_ms": dense_seconds * 1e3, "time_vs_dense": ratio, "speedup": 1 / ratio,
                            "fraction_of_ideal": needed / ratio,
                        }
                        if bandwidth is not None:
                            row["memory_floor_ms"] = tokens * (n + m) * x.element_size() / bandwidth * 1e3
                        if compact and device.type == "cuda":  # every execution the calibration did not rule out
                            row["kernel_relative_error"] = relative_error(layer.run(x, "kernel"), layer.run(x, "dense"))
                            row["kernel_tiles"] = str(layer._layout().tiles_for(tokens))  # calibration's pick
                            row["executions_vs_dense"] = {
                                e: captured_time(lambda t, e=e: layer.run(t, e), dense, x, device, max(3, args.repeats // 2),
                                                 args.graphs)[0]
                                for e in layer.executions() if e not in layer._hopeless or e in ("dense", "kernel")
                            }
                        rows.append(row)
                        print(row, flush=True)
            write(rows, device, args.repeats, args.graphs, bandwidth)  # so far: a run stopped early keeps what it measured


if __name__ == "__main__":
    main()
