"""Whole-model inference with compact GBLR layers: trained Fashion-MNIST ViTs and a compressed MiniLM.

    .venv/bin/python benchmarks/compact_model.py [--runs runs/benchmark-hw/fmnist-vit-small-gblr-0.3 ...] [--device cuda]

For each trained GBLR run (``gblr train`` run directories; by default the two runs of the hardware-aware
quality benchmark) and for MiniLM compressed to 50 % (GBLR, global allocation): the eval-mode model
(which multiplies by every layer's effective dense weight, i.e. dense speed) against ``compact(model)``:
latency (median of ``repeats`` interleaved repetitions) at batch 1 and 256 images / 1 and 64 sentences,
and agreement: identical test-set predictions for the ViTs, maximal embedding difference for MiniLM.
Writes benchmarks/results/compact_model.{json,md} (compact_model_cuda.* on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _results import device_note, graphed, provenance, run_metadata, synchronize, write_results

from gblr.compact import CompactGBLRLinear, compact
from gblr.compress import compress_
from gblr.data import shakespeare_sentences
from gblr.device import resolve_device
from gblr.pretrained import encode_sentences, load_pretrained, sentence_embeddings
from gblr.train import load_trained

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = [str(ROOT / "runs/benchmark-hw" / name) for name in ("fmnist-vit-small-gblr-0.3", "fmnist-vit-small-gblr-0.3-hw")]


@torch.no_grad()
def latency(models: dict, inputs, repeats: int, device: torch.device, graphs: bool = False) -> dict[str, float]:
    """Median seconds per call of every model on ``inputs``, repetitions interleaved (``graphs``: each
    call replayed from a CUDA graph, the GPU's time alone)."""
    calls = {name: (lambda m=model: m(**inputs)) if isinstance(inputs, dict) else (lambda m=model: m(inputs))
             for name, model in models.items()}
    for call in calls.values():
        call()  # warm-up (and each compact layer's calibration for this token count)
    if graphs:
        try:
            calls = {name: graphed(call) for name, call in calls.items()}
        except RuntimeError as error:  # a model that reads values back to the host while capturing
            print(f"not captured in a CUDA graph: {str(error).splitlines()[0][:160]}", flush=True)
            return {name: float("nan") for name in models}
    samples = {name: [] for name in models}
    for _ in range(repeats):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def executions(model) -> dict[str, int]:
    """How many compact layers run each execution at 256 tokens (what their calibration chose)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, CompactGBLRLinear):
            choice = module.choose(256)
            counts[choice] = counts.get(choice, 0) + 1
    return counts


def vit_rows(run: str, repeats: int, device: torch.device, graphs: bool) -> list[dict]:
    model, config, data = load_trained(run, device)
    start = time.perf_counter()
    fast = compact(model)
    build = time.perf_counter() - start
    x, y = (t.to(device) for t in data["test"])
    with torch.no_grad():
        reference = torch.cat([model(b) for b in x.split(500)])
        logits = torch.cat([fast(b) for b in x.split(500)])
    agreement = {
        "test_images": len(y), "identical_predictions": int((reference.argmax(-1) == logits.argmax(-1)).sum()),
        "accuracy": float((reference.argmax(-1) == y).float().mean()),
        "max_relative_logit_difference": float((logits - reference).abs().max() / reference.abs().max()),
    }
    rows = []
    for batch in (1, 256):
        times = latency({"eval": model, "compact": fast}, x[:batch], repeats, device, graphs)
        rows.append({"model": config.name, "structure": f"rank {config.structure.rank}, tile {config.structure.tile}",
                     "batch": batch, "eval_ms": times["eval"] * 1e3, "compact_ms": times["compact"] * 1e3,
                     "speedup": times["eval"] / times["compact"], "build_seconds": build,
                     "executions_at_256_tokens": executions(fast), **agreement})
        print(rows[-1], flush=True)
    return rows


def minilm_rows(repeats: int, device: torch.device, source: str, graphs: bool) -> list[dict]:
    pretrained = load_pretrained(source)
    model = pretrained.model.to(device)
    compress_(model, "gblr", 0.5, "global", options={"steps": 0})
    start = time.perf_counter()
    fast = compact(model)
    build = time.perf_counter() - start
    sentences = shakespeare_sentences("val")[:256]
    rows = []
    for batch in (1, 64):
        inputs = {k: v.to(device) for k, v in encode_sentences(pretrained.tokenizer, sentences[:batch]).items()}
        with torch.no_grad():
            reference, embeddings = sentence_embeddings(model, inputs), sentence_embeddings(fast, inputs)
        times = latency({"eval": model, "compact": fast}, inputs, repeats, device, graphs)
        carried = "" if source == "minilm" else " (weights from " + source + ")"
        rows.append({"model": f"all-MiniLM-L6-v2{carried}, GBLR 0.5 global", "structure": "rank 1, tile 1 (fitted)", "batch": batch,
                     "eval_ms": times["eval"] * 1e3, "compact_ms": times["compact"] * 1e3,
                     "speedup": times["eval"] / times["compact"], "build_seconds": build,
                     "executions_at_256_tokens": executions(fast),
                     "max_embedding_difference": float((embeddings - reference).abs().max()),
                     "tokens": int(inputs["attention_mask"].numel())})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--minilm", default="minilm", help="the installed package (default) or a copy's directory")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--name", default="compact_model", help="results file name (_cuda is added on a GPU)")
    parser.add_argument("--graphs", action="store_true", help="time CUDA graph replays (the GPU's time without the "
                        "host's); _graphs is added to the name")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.graphs and device.type != "cuda":
        parser.error("--graphs needs a CUDA device")
    torch.set_num_threads(2)
    rows = [row for run in args.runs for row in vit_rows(run, args.repeats, device, args.graphs)]
    if not args.skip_minilm:
        rows += minilm_rows(args.repeats, device, args.minilm, args.graphs)
    meta = run_metadata(device_note(device), repeats=args.repeats, cuda_graphs=args.graphs)
    lines = ["# Whole-model inference: eval model vs compact()", "", provenance(meta), "",
             "`eval` multiplies by every GBLR layer's effective dense weight (dense speed for those layers); "
             "`compact` runs each layer's calibrated execution (dense / factored / blocks / slices / kernel). Latency: median of "
             f"{args.repeats} interleaved repetitions"
             + (", each a replay of the call from a CUDA graph (the GPU's time without the host's)." if args.graphs else "."), "",
             "| model | structure | batch | eval ms | compact ms | speedup | executions at 256 tokens | agreement |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "identical_predictions" in r:
            agree = (f"{r['identical_predictions']}/{r['test_images']} identical test predictions "
                     f"(max rel. logit diff {r['max_relative_logit_difference']:.1e}); accuracy {r['accuracy']:.4f}")
        else:
            agree = f"max embedding difference {r['max_embedding_difference']:.1e} ({r['tokens']} tokens)"
        lines.append(f"| {r['model']} | {r['structure']} | {r['batch']} | {r['eval_ms']:.2f} | {r['compact_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['executions_at_256_tokens']} | {agree} |")
    name = args.name if device.type == "cpu" else f"{args.name}_{device.type}"
    write_results(name + ("_graphs" if args.graphs else ""), meta, rows, lines)


if __name__ == "__main__":
    main()
