"""Tile sizes of the compact layer's Triton kernels on this GPU: time per call of each candidate.

    PYTHONPATH=src python3 benchmarks/kernel_tiles.py [--tokens 65536] [--dtypes fp32 bf16]

Hardware-aware layers (rank-32 components on 32-row tiles) at cost 0.3, both orientations of
768 x 3072; prints milliseconds per call of nn.Linear and of the kernels with each candidate
(``Tiles(tokens, rank, out, k, k_out, warps, warps_out, stages)``), the default and the candidates a
layer's calibration times (``tile_candidates``) marked, and for the default how the time splits between
the contract and expand launches. Wider contract tiles (``rank``)
read each input column once for several blocks but multiply more zeros; wider output tiles (``out``)
read z fewer times. For choosing defaults; writes benchmarks/results/kernel_tiles_cuda.{json,md}.
"""

from __future__ import annotations

import argparse

import torch
import triton
from _results import device_note, provenance, run_metadata, write_results
from compact_speed import DTYPES, compact_layer, gblr_at_cost, seconds_per_call
from torch import nn

from gblr.compact_kernel import Tiles, default_tiles, tile_candidates

CANDIDATES = {  # (tokens, rank, out, k, k_out, warps, warps_out, stages)
    "bf16": [Tiles(128, 32, 128, 64, 64, 4, 8, 5), Tiles(128, 32, 128, 32, 32, 4, 8, 5), Tiles(128, 32, 64, 32, 32, 4, 4, 7),
             Tiles(128, 32, 256, 32, 32, 4, 8, 5), Tiles(128, 64, 128, 32, 32, 4, 8, 7), Tiles(128, 128, 128, 32, 32, 8, 8, 5)],
    "fp32": [Tiles(64, 32, 64, 32, 32, 4, 4, 5), Tiles(128, 32, 128, 32, 32, 4, 8, 5), Tiles(128, 32, 64, 32, 32, 4, 4, 7),
             Tiles(128, 32, 64, 16, 16, 4, 4, 7), Tiles(128, 32, 64, 32, 32, 4, 4, 4)],
}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[65536])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for n, m in ((768, 3072), (3072, 768)):
        for name in args.dtypes:
            dtype = DTYPES[name]
            fast = compact_layer(gblr_at_cost(n, m, 0.3, True, 0), device, dtype)
            fast.run(torch.randn(8, n, device=device, dtype=dtype), "kernel")  # packs the layout
            layout = fast._kernel_layout
            dense = nn.Linear(n, m).to(device, dtype)
            for tokens in args.tokens:
                x = torch.randn(tokens, n, device=device, dtype=dtype)
                dense_ms = seconds_per_call(dense, x, device, 20) * 1e3
                default = default_tiles(dtype, tokens, layout.rank_tile)
                print(f"{n}x{m} cost 0.3 {name} {tokens} tokens: nn.Linear {dense_ms:.3f} ms", flush=True)
                timed = tile_candidates(dtype, tokens, layout.rank_tile)  # what calibration chooses from
                for tiles in dict.fromkeys(timed + tuple(CANDIDATES["fp32" if name == "fp32" else "bf16"])):
                    row = {"shape": f"{n}x{m}", "dtype": name, "tokens": tokens, "tiles": str(tiles)[6:-1],
                           "default": tiles == default, "calibration_candidate": tiles in timed, "dense_ms": dense_ms}
                    try:
                        layout.run(x, fast.bias, tiles)
                        row["ms"] = seconds_per_call(lambda t: layout.run(t, fast.bias, tiles), x, device, 10) * 1e3
                        if tiles == default:
                            row["contract_ms"] = seconds_per_call(lambda t: layout.contract(t, tiles), x, device, 10) * 1e3
                    except Exception as error:  # a candidate that does not fit this GPU's shared memory
                        row["error"] = type(error).__name__
                    print(row, flush=True)
                    rows.append(row)
            write(rows)  # so far: a run stopped early keeps what it measured


def write(rows: list[dict]) -> None:
    meta = run_metadata(device_note(torch.device("cuda")), triton=triton.__version__)
    lines = [
        "# Tile sizes of the compact layer's Triton kernels (cuda)", "",
        f"{provenance(meta)} Triton {meta['triton']}. Hardware-aware layers at cost 0.3; time per call of the two "
        "launches with each candidate `Tiles` against `nn.Linear` of the same shape and dtype; for the default, "
        "the contract launch's share.", "",
        "| shape | dtype | tokens | tiles | default | calibration candidate | nn.Linear ms | kernel ms | / dense | contract ms |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms, contract = r.get("ms"), r.get("contract_ms")
        kernel = f"{ms:.3f} | {ms / r['dense_ms']:.2f}" if ms else f"{r.get('error', '')} | "
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['tokens']} | {r['tiles']} | {'yes' if r['default'] else ''} | "
                     f"{'yes' if r['calibration_candidate'] else ''} | "
                     f"{r['dense_ms']:.3f} | {kernel} | {f'{contract:.3f}' if contract else ''} |")
    write_results("kernel_tiles_cuda", meta, rows, lines)


if __name__ == "__main__":
    main()
