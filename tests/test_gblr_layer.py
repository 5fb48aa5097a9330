import pytest
import torch
from torch import nn

from gblr import GBLRLinear
from gblr.structured.gblr import splr_widths


def test_from_dense_full_width_matches_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(24, 40, dtype=torch.float64)
    layer = GBLRLinear.from_dense(ref.weight, bias=ref.bias)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    for mode in (layer.train, layer.eval):
        mode()
        assert torch.allclose(layer(x), ref(x), atol=1e-10)
    assert layer.macs_per_token() == 24 * (24 + 40)  # full SVD as rank-1 factors costs more than dense


@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 5), (1, 1, 2, 5)])
def test_any_number_of_leading_dims(shape):
    layer = GBLRLinear(shape[-1], 6)
    x = torch.randn(*shape)
    out = layer(x)
    assert out.shape == (*shape[:-1], 6)
    flat = layer(x.reshape(-1, shape[-1])).reshape(out.shape)
    assert torch.allclose(out, flat, atol=1e-6)


def test_no_bias():
    layer = GBLRLinear(8, 4, bias=False)
    assert layer.bias is None and "bias" not in dict(layer.named_parameters())
    assert layer(torch.zeros(3, 8)).abs().max() == 0
    layer.eval()
    assert layer(torch.zeros(3, 8)).abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes_train_and_eval(dtype):
    layer = GBLRLinear(16, 12, dtype=dtype, sigma=2.0)
    x = torch.randn(4, 16, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert layer.out_widths.grad is not None and layer.in_factors.grad.dtype == dtype
    layer.eval()
    assert layer(x).dtype == dtype


def test_structure_stays_float32_in_half_precision():
    layer = GBLRLinear(16, 12, dtype=torch.bfloat16)
    assert layer.out_widths.dtype == torch.float32 and layer.out_factors.dtype == torch.bfloat16
    layer = GBLRLinear(16, 12).to(torch.bfloat16)
    assert layer.in_starts.dtype == torch.float32 and layer.in_factors.dtype == torch.bfloat16
    assert layer.to(torch.float64).in_widths.dtype == torch.float64
    assert layer(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64


def test_dense_and_skinny_training_paths_agree():
    torch.manual_seed(0)
    layer = GBLRLinear(32, 48, num_components=4, sigma=3.0, dtype=torch.float64)
    few = torch.randn(2, 32, dtype=torch.float64)  # skinny path: 2*4*80 < 4*32*48 + 2*32*48
    many = torch.randn(4096, 32, dtype=torch.float64)  # skinny too; force the dense one by building W
    weight = layer.effective_weight(hard=False)
    for x in (few, many):
        expected = x @ weight.T + layer.bias
        assert torch.allclose(layer(x), expected, atol=1e-10)
    big = GBLRLinear(32, 48, num_components=32, sigma=3.0, dtype=torch.float64)  # dense path wins
    x = torch.randn(4096, 32, dtype=torch.float64)
    assert torch.allclose(big(x), x @ big.effective_weight(hard=False).T + big.bias, atol=1e-10)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = GBLRLinear(20, 30, sigma=5.0)
    b = GBLRLinear(20, 30)
    b.load_state_dict(a.state_dict())
    assert b.sigma == pytest.approx(5.0)
    x = torch.randn(5, 20)
    assert torch.equal(a(x), b(x))
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))


def test_eval_cache_invalidated_when_parameters_change():
    layer = GBLRLinear(16, 16, bias=False, width_init="full")
    layer.eval()
    x = torch.randn(2, 16)
    before = layer(x)
    assert layer(x) is not before and torch.equal(layer(x), before)
    with torch.no_grad():
        layer.out_widths[:8] = 0.5
    after = layer(x)
    assert not torch.allclose(after, before)
    assert torch.allclose(after, x @ layer.effective_weight(hard=True).T)
    layer.sigma = 4.0
    assert not torch.equal(layer(x), after)


def test_eval_uses_hard_masks():
    layer = GBLRLinear(16, 16, bias=False, num_components=2, width_init="full", dtype=torch.float64)
    with torch.no_grad():
        layer.out_widths.copy_(torch.tensor([0.5, 0.4 / 16]))  # second component below one row
        layer.in_widths.copy_(torch.tensor([0.25, 1.0]))
        layer.out_starts.copy_(torch.tensor([0.75, 0.0]))
        layer.in_starts.zero_()
    layer.eval()
    weight = layer.to_dense()
    rows = (weight.abs().sum(1) > 0).nonzero().flatten().tolist()
    cols = (weight.abs().sum(0) > 0).nonzero().flatten().tolist()
    assert rows == [0, 1, 2, 3, 12, 13, 14, 15] and cols == [0, 1, 2, 3]
    assert layer.macs_per_token() == min(1 * (8 + 4), 8 * 4)


@pytest.mark.slow
def test_torch_compile_runs():
    torch.manual_seed(0)
    model = nn.Sequential(GBLRLinear(16, 32, sigma=2.0), nn.GELU(), GBLRLinear(32, 8))
    compiled = torch.compile(model)
    x = torch.randn(4, 16)
    out = compiled(x)
    assert torch.allclose(out, model(x), atol=1e-5)
    out.sum().backward()
    assert model[0].in_widths.grad is not None
    model.eval()
    assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_splr_is_flops_neutral():
    for m, n in [(64, 64), (192, 768), (768, 3072)]:
        layer = GBLRLinear(n, m)
        assert layer.relative_cost() == pytest.approx(1.0, abs=0.03)
    assert splr_widths(4, 1, 64, 64).tolist() == [1.0] * 4  # too few components: all full width


def test_lowrank_width_init():
    layer = GBLRLinear(32, 32, num_components=16, width_init="lr0.25")
    assert layer.active_components().tolist() == [True] * 4 + [False] * 12
    assert layer.macs_per_token() == 4 * 64


def test_component_count_from_rank_ratio():
    assert GBLRLinear(100, 40, rank_ratio=0.5).num_components == 20
    assert GBLRLinear(100, 40, rank=4).num_components == 10
    assert GBLRLinear(100, 40, num_components=7).num_components == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_features": 0}, "in_features"),
        ({"out_features": -3}, "out_features"),
        ({"rank": 0}, "rank"),
        ({"num_components": 0}, "num_components"),
        ({"width_init": "lowrank"}, "width_init"),
        ({"width_init": "lr1.5"}, "width_init"),
        ({"sigma": float("nan")}, "sigma"),
        ({"rank_ratio": -1.0}, "rank_ratio"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    args = {"in_features": 8, "out_features": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        GBLRLinear(**args)


def test_wrong_input_dimension():
    layer = GBLRLinear(8, 4)
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(3, 9))


def test_bad_intervals():
    u, v = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="out_intervals"):
        GBLRLinear.from_intervals([(0, 4)], [(0, 4), (4, 4)], u, v)
    with pytest.raises(ValueError, match="in_intervals"):
        GBLRLinear.from_intervals([(0, 4), (4, 4)], [(0, 4), (4, 9)], u, v)


def test_layers_whose_factors_are_set_skip_the_random_initialisation(monkeypatch, tmp_path):
    """Fitting and loading build layers whose factors are overwritten at once: the SVD of a random matrix
    (about a second for thousands of components) is skipped, and the result is unchanged."""
    from gblr.io import load, save

    torch.manual_seed(0)
    weight = torch.randn(12, 20, dtype=torch.float64)
    expected = GBLRLinear.from_dense(weight).to_dense()
    model = nn.Sequential(GBLRLinear(20, 12, num_components=5))
    save(model, tmp_path / "saved")

    def refuse(self):
        raise AssertionError("random factors computed for a layer whose factors are overwritten")

    monkeypatch.setattr(GBLRLinear, "_set_random_factors", refuse)
    assert torch.allclose(GBLRLinear.from_dense(weight).to_dense(), expected, atol=1e-12)
    factors = torch.randn(3, 2, 12), torch.randn(3, 2, 20)
    layer = GBLRLinear.from_intervals([(0, 4), (2, 6), (8, 4)], [(0, 20), (5, 5), (10, 3)], *factors)
    assert layer.out_factors.shape == (3, 2, 12)
    loaded = load(tmp_path / "saved", nn.Sequential(nn.Linear(20, 12)))
    assert torch.equal(loaded[0].to_dense(), model[0].to_dense())
    plain = GBLRLinear(20, 12, random_factors=False)
    assert plain.out_factors.abs().max() == 0 and plain.in_factors.abs().max() == 0
    with pytest.raises(AssertionError, match="random factors"):
        GBLRLinear(20, 12)


def _frozen_layer(num_components, **options):
    torch.manual_seed(0)
    layer = GBLRLinear(40, 24, dtype=torch.float64, num_components=num_components, **options)
    with torch.no_grad():  # irregular, overlapping and wrapping intervals
        layer.out_starts.uniform_(0, 1)
        layer.in_starts.uniform_(0, 1)
        layer.out_widths.uniform_(0, 0.6)
        layer.in_widths.uniform_(0, 0.6)
    for p in layer.structure_parameters():
        p.requires_grad_(False)
    return layer.train()


@pytest.mark.parametrize("num_components, options, blocks", [
    (60, {}, True), (50, {"rank": 3, "tile": 4}, True), (60, {"width_init": "lr0.5"}, True),
    (3, {}, False),  # few components: the skinny products are cheaper
])
def test_frozen_structure_trains_the_eval_weight(monkeypatch, num_components, options, blocks):
    """With widths and starts frozen, the training forward is the eval-mode function and the factors get
    the same gradients as through the full-length masked product; with many components the weight is
    built from the factors cropped to their intervals, at a fraction of the masked product's cost."""
    from gblr.structured.frozen_blocks import FrozenBlocks

    layer = _frozen_layer(num_components, **options)
    assert layer.structure_frozen()
    frozen = layer._frozen_blocks()
    assert frozen.macs < layer.num_components * layer.rank * 24 * 40 / 2
    assert torch.allclose(frozen.weight(layer.out_factors, layer.in_factors), layer.effective_weight(hard=True), atol=1e-12)
    calls = []
    monkeypatch.setattr(FrozenBlocks, "weight", lambda self, *a, real=FrozenBlocks.weight: calls.append(1) or real(self, *a))
    x = torch.randn(5, 40, dtype=torch.float64)
    y = layer(x)
    assert bool(calls) == blocks
    assert torch.allclose(y, x @ layer.effective_weight(hard=True).T + layer.bias, atol=1e-12)
    y.pow(2).sum().backward()
    grads = [p.grad.clone() for p in layer.factor_parameters()]
    layer.zero_grad()
    u, v = layer.masked_factors(hard=True)
    (x @ (u.T @ v).T + layer.bias).pow(2).sum().backward()
    for got, want in zip(grads, [p.grad for p in layer.factor_parameters()]):
        assert torch.allclose(got, want, atol=1e-10)
    for p in layer.structure_parameters():
        p.requires_grad_(True)
    assert not layer.structure_frozen()


@pytest.mark.parametrize("num_components, options", [(60, {}), (50, {"rank": 3, "tile": 4}), (3, {})])
def test_packed_training_is_the_frozen_function_with_the_same_gradients(num_components, options):
    """Packed parameters hold the factor entries inside the intervals: the same outputs and, on those
    entries, the same gradients as the full-length factors (built weight or skinny products); unpacking
    writes them back."""
    layer = _frozen_layer(num_components, **options)
    x = torch.randn(5, 40, dtype=torch.float64)
    y = layer(x)
    y.pow(2).sum().backward()
    full_grads = [p.grad.clone() for p in layer.factor_parameters()]
    layer.zero_grad()
    assert layer.pack_for_training_()
    assert not any(p.requires_grad for p in layer.factor_parameters())
    packed = layer(x)
    assert torch.allclose(packed, y, atol=1e-12)
    packed.pow(2).sum().backward()
    supports = layer._factor_support()
    for param, grad, support in zip((layer.out_packed, layer.in_packed), full_grads, supports):
        assert torch.allclose(param.grad, grad[support], atol=1e-10)
        assert param.numel() == int(support.sum())
    with torch.no_grad():
        layer.out_packed.add_(1.0)
    expected = layer(x).detach()
    layer.unpack_after_training_()
    assert not hasattr(layer, "out_packed") and all(p.requires_grad for p in layer.factor_parameters())
    assert set(dict(layer.named_parameters())) == {"out_factors", "in_factors", "out_widths", "out_starts",
                                                    "in_widths", "in_starts", "bias"}
    assert torch.allclose(layer(x), expected, atol=1e-10)


def test_packing_needs_frozen_exact_structure():
    layer = _frozen_layer(10)
    layer.sigma = 2.0
    assert not layer.pack_for_training_()
    for p in layer.structure_parameters():
        p.requires_grad_(True)
    layer.sigma = None
    assert not layer.pack_for_training_() and not hasattr(layer, "out_packed")


def test_frozen_structure_follows_changes_of_the_structure():
    layer = _frozen_layer(60)
    x = torch.randn(3, 40, dtype=torch.float64)
    layer(x)
    with torch.no_grad():
        layer.out_widths.fill_(0.25)
    assert torch.allclose(layer(x), x @ layer.effective_weight(hard=True).T + layer.bias, atol=1e-12)


def test_frozen_structure_under_bf16_autocast():
    layer = _frozen_layer(60).float()
    x = torch.randn(5, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), x @ layer.effective_weight(hard=True).T + layer.bias, atol=0.05, rtol=0.05)
    y.float().sum().backward()
    assert layer.out_factors.grad.abs().sum() > 0
