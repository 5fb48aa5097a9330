"""Block replay: the blocks before a changed layer return recorded outputs only where that is exact."""

import contextlib
import copy
from unittest import mock

import pytest
import torch
from torch import nn

from gblr.allocate import layer_sensitivities
from gblr.compress import compress_
from gblr.convert import select_layers
from gblr.fit import structured_from_dense
from gblr.replay import BlockReplay, RollingReplay

transformers = pytest.importorskip("transformers")


class Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class Stack(nn.Module):
    """Blocks of two linear layers; ``order`` and ``passes`` choose how the forward pass runs them, and
    ``residual`` whether the residual sum is the model's (outside the blocks) or each block's own."""

    def __init__(self, blocks: int = 4, width: int = 24, order: str = "forward", passes: int = 1, shared: bool = False,
                 residual: str = "outside"):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
                                    for _ in range(blocks))
        if shared:
            self.blocks[2][0] = self.blocks[0][0]
        if residual == "inside":
            self.blocks = nn.ModuleList(Residual(block) for block in self.blocks)
        self.head = nn.Linear(width, 1)
        self.order, self.passes, self.residual = order, passes, residual

    def forward(self, x):
        for _ in range(self.passes):
            for block in (self.blocks if self.order == "forward" else reversed(self.blocks)):
                x = block(x) if self.residual == "inside" else x + block(x)
        return self.head(x)


def direct_sensitivities(model, layers, loss_fn):
    """The loss increase of each layer's low-rank fit, every run in full."""
    base, result = loss_fn(model), {}
    for name, module in layers.items():
        fitted = structured_from_dense("lowrank", module.weight, 0.3, module.bias).eval()
        model.set_submodule(name, fitted)
        result[name] = loss_fn(model) - base
        model.set_submodule(name, module)
    return result


def linear_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features > 1}


def counting_calls(model):
    counts = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("variant", [{}, {"order": "reverse"}, {"passes": 2}, {"shared": True}])
def test_sensitivities_equal_those_run_in_full_and_replay_only_where_exact(variant):
    torch.manual_seed(0)
    model = Stack(**variant).eval()
    data = [torch.randn(16, 24) for _ in range(3)]  # three forward passes per loss

    def loss_fn(m):
        with torch.no_grad():
            return float(sum(m(x).square().mean() for x in data))

    layers = linear_layers(model)
    expected = direct_sensitivities(model, layers, loss_fn)
    counts = counting_calls(model)
    measured = layer_sensitivities(model, layers, loss_fn, "lowrank", 0.3)
    for name in layers:
        assert measured[name][0] == pytest.approx(expected[name], rel=1e-6, abs=1e-9)
    full = 3 * (1 + len(layers)) * variant.get("passes", 1)  # every block in every pass of every loss
    if variant:  # not safe (found when recording, or for shared modules at once): everything ran in full
        assert counts[0] == full
    else:  # a layer of block i skips blocks 0 .. i-1: block 0 runs only for the base loss and its own layers
        assert counts[0] < full and counts[-1] >= full
    assert all(isinstance(block, nn.Sequential) for block in model.blocks)  # every block put back


def tiny_llama(layers: int = 3):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config).eval()
    windows = torch.randint(0, 64, (4, 12))
    # two forward passes, with the model's key-value cache
    return model, "model.layers.", lambda m: float(sum(m(input_ids=b, labels=b).loss for b in windows.split(2)))


def tiny_bert(layers: int = 3):
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                     num_attention_heads=2)
    model = transformers.BertModel(config).eval()
    ids, mask = torch.randint(1, 64, (4, 10)), torch.ones(4, 10, dtype=torch.long)
    mask[0, 6:] = 0  # padding: the attention mask built outside the layers must reach them as before
    return model, "encoder.layer.", lambda m: float(m(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean())


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_hugging_face_models_skip_earlier_layers_with_the_same_losses(build):
    torch.manual_seed(0)
    model, prefix, loss = build()

    def loss_fn(m):
        with torch.no_grad():
            return loss(m)

    layers = {name: m for name, m in linear_layers(model).items() if name.startswith(prefix)}
    replay = BlockReplay(model, list(layers))
    assert replay.enabled and replay.block_of(f"{prefix}2.{'mlp.up_proj' if 'model' in prefix else 'output.dense'}") == 2
    assert replay.block_of("lm_head") == 0
    base = replay.record(lambda: loss_fn(model))
    assert replay.enabled  # replaying all but the last layer gave the recorded loss
    expected = direct_sensitivities(model, layers, loss_fn)
    measured = layer_sensitivities(model, layers, loss_fn, "lowrank", 0.3)
    assert loss_fn(model) == base  # the model is unchanged
    for name in layers:
        assert measured[name][0] == pytest.approx(expected[name], rel=1e-5, abs=1e-7)


def test_a_run_that_differs_from_the_recording_is_an_error():
    torch.manual_seed(0)
    model = Stack().eval()
    replay, x = BlockReplay(model, list(linear_layers(model))), torch.randn(4, 24)
    with torch.no_grad():
        replay.record(lambda: float(model(x).sum()))
        assert replay.enabled
        with pytest.raises(RuntimeError, match="called more often"), replay.skipping(2):
            model(torch.randn(4, 24))
            model(torch.randn(4, 24))
        with pytest.raises(RuntimeError, match="less often"), replay.skipping(2):
            pass
    assert all(isinstance(block, nn.Sequential) for block in model.blocks)


def sequential_compression(model, calibrate, rolling: bool, refit_kept: bool = False):
    """The model compressed with sequential low-rank output fits, with or without rolling replay, and the
    number of times its first block ran. With ``refit_kept``, every other layer is kept dense and refitted."""
    model = copy.deepcopy(model)
    names = list(select_layers(model, None)[0])
    allocation = {name: 1.0 if i % 2 else 0.4 for i, name in enumerate(names)} if refit_kept else "uniform"
    counts = [0]
    blocks = next(m for m in model.modules() if isinstance(m, nn.ModuleList))
    blocks[0].register_forward_pre_hook(lambda module, args: counts.__setitem__(0, counts[0] + 1))
    with contextlib.ExitStack() as stack:
        if not rolling:
            stack.enter_context(mock.patch.object(RollingReplay, "measure", lambda self, names, measure: measure()))
        compress_(model, "lowrank", 0.4, allocation, calibration_inputs=calibrate, sequential=True, refit_kept=refit_kept)
    return model, counts[0]


@pytest.mark.parametrize("variant", [{}, {"order": "reverse"}, {"passes": 2}, {"shared": True}, {"uses_output": True},
                                     {"residual": "outside"}])
def test_sequential_fits_through_two_blocks_equal_those_run_in_full(variant):
    torch.manual_seed(0)
    uses_output = variant.pop("uses_output", False)
    # blocks hold their residual sums, as in transformers; with the sums outside them (a variant), a
    # block's input is not the last block's output alone
    model = Stack(blocks=10, **{"residual": "inside", **variant}).eval()
    data = [torch.randn(64, 24) for _ in range(3)]
    # a run that uses the model's outputs cannot be shortened: it must be noticed, and run in full
    calibrate = (lambda m: [float(m(x).sum()) for x in data]) if uses_output else (lambda m: [m(x) for x in data])
    full, full_calls = sequential_compression(model, calibrate, rolling=False)
    rolled, rolled_calls = sequential_compression(model, calibrate, rolling=True)
    x = torch.randn(32, 24)
    with torch.no_grad():
        assert torch.allclose(rolled(x), full(x), rtol=1e-5, atol=1e-6)
    if variant or uses_output:
        assert rolled_calls >= full_calls  # replaying was not safe: everything ran in full (plus one check)
    else:  # block 0 runs for the statistics, its own groups and the checks of each kind of run, not for every group
        assert rolled_calls < full_calls / 2


@pytest.mark.parametrize("refit_kept", [False, True])
@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_sequential_fits_of_hugging_face_models_through_two_blocks_equal_those_run_in_full(build, refit_kept):
    torch.manual_seed(0)
    model, prefix, loss = build(layers=8)
    batches = [torch.randint(0, 64, (2, 12)) for _ in range(3)]

    def calibrate(m):
        for ids in batches:
            m(input_ids=ids)

    full, full_calls = sequential_compression(model, calibrate, rolling=False, refit_kept=refit_kept)
    rolled, rolled_calls = sequential_compression(model, calibrate, rolling=True, refit_kept=refit_kept)
    with torch.no_grad():
        assert loss(rolled) == pytest.approx(loss(full), rel=1e-5)
    assert rolled_calls < full_calls / 2
