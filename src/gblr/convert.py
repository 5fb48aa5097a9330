"""Model surgery: replace a model's linear layers and convolutions by structured layers, in place, with one call.

    report = convert_(model, ConvertConfig(family="gblr", budget=0.5), filter_fn=lambda module, name: ...)

``filter_fn(module, name)`` decides which candidate layers are converted (default: every candidate
except language-model heads and layers whose weight is tied to an embedding). Candidates are
``nn.Linear``, the transposed ``Conv1D`` linear layers some Hugging Face models (GPT-2) use, and
``nn.Conv2d`` (``groups=1``, zero padding; it becomes a :class:`StructuredConv2d` whose weight is one
structured matrix or one per kernel tap, ``ConvertConfig.conv_layout``). Other layer types with a weight
matrix (``Conv1d``, grouped or transposed convolutions, ...) are listed in the report as skipped, by type.
Each new layer keeps the replaced layer's bias, device and dtype, and is initialised from its dense weight
(projection or fit) or, with ``init="random"``, freshly at the budget for training from scratch.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .fit import fit_gblr, learned_fit, output_error, relative_error, structured_from_dense
from .structured import FAMILIES, StructuredConv2d, StructuredLinear, make_structured
from .structured.conv import check_layout, conv_matrices, conv_unsupported

__all__ = ["ConvertConfig", "ConversionReport", "convert_", "select_layers", "linear_weight", "default_filter",
           "family_options"]

log = logging.getLogger(__name__)

INITS = ("dense", "random")
EXCLUDED, TIED = "excluded by the filter", "weight tied to an embedding"  # reasons a layer is not selected
UNSUPPORTED = "unsupported layer type: "  # followed by the type; not a failure, the layer was never a candidate
KEPT_DENSE = "kept dense: the global allocation gave it its full cost"


@dataclass
class ConvertConfig:
    """What to convert into: a family of :mod:`gblr.structured`, a budget (fraction of each replaced
    layer's dense cost), how to initialise, the family's own options (e.g. ``rank``, ``tile``), and how a
    convolution's weight becomes matrices (``"matrix"``: one, ``"taps"``: one per kernel tap)."""

    family: str = "gblr"
    budget: float = 0.5
    init: str = "dense"
    options: dict = field(default_factory=dict)
    conv_layout: str = "matrix"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family: unknown structured family {self.family!r}; known families: {', '.join(FAMILIES)}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not (0 < self.budget <= 1):
            raise ValueError(f"budget must be a fraction of the dense cost in (0, 1], got {self.budget!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        check_layout(self.conv_layout, "conv_layout")
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict of keyword arguments, got {type(self.options).__name__}")
        known = family_options(self.family, self.init)
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise ValueError(f"options {unknown} are not options of family {self.family!r} with init {self.init!r}; "
                             f"it takes {sorted(known)}")


def _keywords(function) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds}


def family_options(family: str, init: str = "dense") -> set[str]:
    """The option names ``ConvertConfig.options`` may hold for ``family`` and ``init``: those of the GBLR
    fit (dense init of GBLR), else of the family's constructor and its budget sizing."""
    if family == "gblr" and init == "dense":
        return (_keywords(fit_gblr) | _keywords(learned_fit)) - {"weight", "budget", "bias", "gram"}
    cls = FAMILIES[family]
    return (_keywords(cls.__init__) | _keywords(cls.size_for_budget)) - {
        "self", "cls", "in_features", "out_features", "bias", "device", "dtype", "budget"}


@dataclass
class ConvertedLayer:
    name: str
    in_features: int
    out_features: int
    family: str
    budget: float
    reached_cost: float
    relative_error: float | None  # ||W_structured - W|| / ||W|| when initialised from the dense weight
    seconds: float
    output_error: float | None = None  # ||(W_structured - W) X^T|| / ||W X^T|| on calibration inputs, when fitted to them


@dataclass
class ConversionReport:
    replaced: list[ConvertedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    @property
    def failed(self) -> list[tuple[str, str]]:
        """Selected layers that could not be converted (e.g. a budget the family cannot reach), with why."""
        return [(name, reason) for name, reason in self.skipped
                if reason not in (EXCLUDED, TIED, KEPT_DENSE) and not reason.startswith(UNSUPPORTED)]

    def to_dict(self) -> dict:
        return {"replaced": [asdict(r) for r in self.replaced], "skipped": [list(s) for s in self.skipped]}

    def to_markdown(self) -> str:
        outputs = any(r.output_error is not None for r in self.replaced)  # fitted to calibration inputs
        lines = [
            "| layer | in | out | family | budget | reached cost | relative error |" + (" output error |" if outputs else "")
            + " seconds |",
            "|---|---:|---:|---|---:|---:|---:|" + ("---:|" if outputs else "") + "---:|",
        ]
        for r in self.replaced:
            error = "-" if r.relative_error is None else f"{r.relative_error:.4f}"
            output = ("-" if r.output_error is None else f"{r.output_error:.4f}") + " | " if outputs else ""
            lines.append(
                f"| {r.name} | {r.in_features} | {r.out_features} | {r.family} | {r.budget:.3f} | "
                f"{r.reached_cost:.3f} | {error} | {output}{r.seconds:.2f} |"
            )
        if self.skipped:
            lines += ["", "| skipped | reason |", "|---|---|"]
            lines += [f"| {name} | {reason} |" for name, reason in self.skipped]
        return "\n".join(lines)


def _is_conv1d(module: nn.Module) -> bool:
    # Hugging Face's Conv1D (GPT-2): weight (in, out), y = x W + b. Detected by shape of API, no import.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``(out, in)`` weight of a linear layer (``nn.Linear`` or ``Conv1D``), or None for other modules."""
    if isinstance(module, StructuredLinear):
        return None
    if isinstance(module, nn.Linear):
        return module.weight
    if _is_conv1d(module):
        return module.weight.T
    return None


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def default_filter(module: nn.Module, name: str) -> bool:
    """Convert every candidate layer except heads: language-model and classifier heads and BERT's pooler
    (tied embeddings are skipped separately)."""
    parts = name.split(".")
    return parts[-1] not in ("lm_head", "head", "classifier", "score") and "pooler" not in parts


def _unsupported(module: nn.Module) -> str | None:
    """Why a layer with a weight matrix cannot be converted (None for supported layers and non-layers)."""
    if isinstance(module, nn.Conv2d):
        return conv_unsupported(module)
    if isinstance(module, nn.modules.conv._ConvNd):
        return type(module).__name__
    return None


def _is_candidate(module: nn.Module) -> bool:
    return linear_weight(module) is not None or (isinstance(module, nn.Conv2d) and conv_unsupported(module) is None)


def select_layers(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None
                  ) -> tuple[dict[str, nn.Module], list[tuple[str, str]]]:
    """The layers ``convert_`` would replace (by name), and the skipped ones with the reason (layers of
    types it cannot convert are named by type)."""
    filter_fn = filter_fn or default_filter
    tied = _embedding_weights(model)
    structured = [name for name, m in model.named_modules() if isinstance(m, (StructuredLinear, StructuredConv2d))]
    selected, skipped = {}, []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{s}.") for s in structured):
            continue
        problem = _unsupported(module)
        if problem is not None:
            skipped.append((name, UNSUPPORTED + problem))
        elif not _is_candidate(module):
            continue
        elif not filter_fn(module, name):
            skipped.append((name, EXCLUDED))
        elif id(module.weight) in tied:
            skipped.append((name, TIED))
        else:
            selected[name] = module
    return selected, skipped


def _structured(config: ConvertConfig, weight: torch.Tensor, bias: torch.Tensor | None, budget: float,
                gram: torch.Tensor | None = None) -> StructuredLinear:
    """One structured layer for the dense ``(out, in)`` matrix ``weight`` per ``config``."""
    if config.init == "dense":
        return structured_from_dense(config.family, weight, budget, bias, gram=gram, **config.options)
    out_features, in_features = weight.shape
    return make_structured(config.family, in_features, out_features, budget, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype, **config.options)


def convert_(
    model: nn.Module,
    config: ConvertConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    budgets: dict[str, float] | None = None,
    grams: dict[str, torch.Tensor] | None = None,
) -> ConversionReport:
    """Replace the selected linear layers and convolutions of ``model`` in place; returns what was
    replaced and skipped.

    ``budgets`` optionally gives a per-layer budget by qualified name (e.g. from a global allocation);
    other layers get ``config.budget``. ``grams`` optionally gives linear layers the second moment of
    their inputs on calibration data (:func:`gblr.calibration.input_grams`): their fits then minimise
    the error of the layer's outputs (GBLR and low-rank, with ``init="dense"``). Example::

        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10))
        report = gblr.convert_(model, gblr.ConvertConfig("gblr", budget=0.5),
                               filter_fn=lambda module, name: name != "2")   # keep the head dense
        print(report.to_markdown())                # per layer: reached cost and relative error
    """
    config = config or ConvertConfig()
    selected, skipped = select_layers(model, filter_fn)
    grams = grams or {}
    if grams and config.init != "dense":
        raise ValueError("grams are used to fit dense weights; they need init='dense'")
    unknown = sorted(name for name in grams if name not in selected or isinstance(selected[name], nn.Conv2d))
    if unknown:
        raise ValueError(f"grams: {unknown[0]!r} is not a selected linear layer")
    report = ConversionReport(skipped=skipped)
    # A bar on a terminal only (fits of large layers take seconds each).
    for name, module in tqdm(selected.items(), desc="convert", disable=None, leave=False):
        conv = isinstance(module, nn.Conv2d)
        weight = (module.weight if conv else linear_weight(module)).detach()
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        budget = (budgets or {}).get(name, config.budget)
        start = time.perf_counter()
        try:
            if conv:  # the bias goes with the first matrix
                matrices = conv_matrices(weight, config.conv_layout)
                layers = [_structured(config, matrix, bias if i == 0 else None, budget) for i, matrix in enumerate(matrices)]
                layer = StructuredConv2d.like(module, layers, config.conv_layout)
            else:
                layer = _structured(config, weight, bias, budget, grams.get(name))
        except ValueError as error:  # e.g. a budget this family cannot reach for this shape
            report.skipped.append((name, str(error)))
            continue
        layer.train(module.training)
        error = outputs = None
        if config.init == "dense":
            with torch.no_grad():
                was_training = layer.training
                layer.eval()
                error = relative_error(layer.to_dense(), weight)
                if name in grams:
                    outputs = output_error(layer.to_dense(), weight, grams[name])
                layer.train(was_training)
        model.set_submodule(name, layer)
        out_features, in_features = weight.shape[0], weight[0].numel()
        report.replaced.append(
            ConvertedLayer(name, in_features, out_features, config.family, budget, layer.relative_cost(),
                           error, time.perf_counter() - start, outputs)
        )
        log.info("converted %s (%dx%d) to %s at %.3f", name, in_features, out_features, config.family, budget)
    return report
