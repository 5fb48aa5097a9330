import copy

import pytest
import torch
from torch import nn

from gblr import GBLRLinear
from gblr.convert import ConvertConfig, convert_
from gblr.learn import gblr_layers
from gblr.models import ViT, paper_filter
from gblr.shared_masks import share_masks


def small_vit(dtype=torch.float64, tile_layer=False):
    torch.manual_seed(0)
    model = ViT(28, 4, 1, 10, dim=32, depth=2, heads=2).to(dtype)
    convert_(model, ConvertConfig("gblr", 1.0, init="random"), paper_filter)
    gen = torch.Generator().manual_seed(1)
    for index, (_, layer) in enumerate(gblr_layers(model)):
        layer.sigma = [None, 3.0, 40.0][index % 3]  # layers of one group with different sigmas
        with torch.no_grad():
            for p in layer.structure_parameters():
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype))
    if tile_layer:  # a hardware-aware layer and a layer without rounding beside the others
        model.blocks[0].mlp.fc1 = GBLRLinear(32, 128, rank=4, tile=8, sigma=2.0).to(dtype)
        model.blocks[1].attn.q = GBLRLinear(32, 32, sigma=2.0, round_to_grid=False).to(dtype)
    return model


def loss_and_grads(model, x):
    model.zero_grad()
    loss = model(x).square().sum()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tile_layer", [False, True])
def test_shared_masks_give_the_same_loss_and_gradients(tile_layer):
    model = small_vit(tile_layer=tile_layer)
    x = torch.randn(6, 28, 28, dtype=torch.float64)
    separate = loss_and_grads(model, x)
    shared_model = copy.deepcopy(model)
    share_masks(shared_model)
    used = []
    for _, layer in gblr_layers(shared_model):
        layer.register_forward_pre_hook(lambda module, args: used.append(module.shared is not None))
    shared = loss_and_grads(shared_model, x)
    assert used == [layer.round_to_grid for _, layer in gblr_layers(shared_model)]  # every rounded layer shared
    assert torch.allclose(separate[0], shared[0], rtol=1e-12)
    for name, grad in separate[1].items():
        assert torch.allclose(grad, shared[1][name], rtol=1e-9, atol=1e-12), name
    assert all(layer.shared is None for _, layer in gblr_layers(shared_model))  # dropped after the pass


def test_shared_masks_leave_eval_and_outside_calls_alone():
    model = small_vit(torch.float32)
    x = torch.randn(4, 28, 28)
    reference = copy.deepcopy(model)
    handle = share_masks(model)
    model.eval(), reference.eval()
    assert torch.equal(model(x), reference(x))
    model.train(), reference.train()
    layer = model.blocks[0].attn.q  # called on its own, it computes its own masks
    tokens = torch.randn(3, 32)
    assert torch.allclose(layer(tokens), reference.blocks[0].attn.q(tokens))
    handle.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.allclose(model(x), reference(x), atol=1e-6)


def test_shared_masks_survive_an_error_in_forward():
    model = small_vit(torch.float32)
    share_masks(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 5))  # wrong image size
    assert all(layer.shared is None for _, layer in gblr_layers(model))


def test_compiled_model_with_shared_masks():
    torch.manual_seed(0)
    model = nn.Sequential(GBLRLinear(16, 32, sigma=2.0), nn.GELU(), GBLRLinear(32, 16, sigma=2.0))
    reference = copy.deepcopy(model)
    share_masks(model)
    compiled = torch.compile(model)
    x = torch.randn(64, 16)
    out = compiled(x)
    assert torch.allclose(out, reference(x), atol=1e-5)
    out.sum().backward()
    reference(x).sum().backward()
    assert torch.allclose(model[0].in_widths.grad, reference[0].in_widths.grad, rtol=1e-4, atol=1e-4)
