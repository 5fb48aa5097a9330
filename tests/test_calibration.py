"""Fits of a layer's outputs on calibration inputs (input second moments, whitened low-rank and GBLR fits)."""

import copy

import pytest
import torch
from torch import nn

from gblr.calibration import corrected_weight, damped, input_grams, paired_moments
from gblr.cli import main
from gblr.compress import compress_
from gblr.convert import ConvertConfig, convert_
from gblr.fit import _TilePieces, fit_gblr, output_error, relative_error, structured_from_dense


def _anisotropic_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    """Inputs whose features have scales from 1 to 0.01 in a random order (as activations do)."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, features)[torch.randperm(features, generator=generator)]
    return torch.randn(tokens, features, generator=generator) * scales


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.q(x) * self.k(x) + self.v(x))


@torch.no_grad()
def _output_error_against(reference: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    return relative_error(model(x), reference(x))


def test_input_grams_are_the_second_moment_of_each_layers_inputs():
    torch.manual_seed(0)
    model = Attention()
    batches = [torch.randn(3, 5, 16) for _ in range(4)]
    grams = input_grams(model, {"q": model.q, "k": model.k, "out": model.out}, lambda m: [m(b) for b in batches])
    x = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    torch.testing.assert_close(grams["q"], x.T @ x / len(x))
    torch.testing.assert_close(grams["k"], grams["q"])
    with torch.no_grad():
        hidden = torch.cat([(model.q(b) * model.k(b) + model.v(b)).reshape(-1, 8) for b in batches]).double()
    torch.testing.assert_close(grams["out"], hidden.T @ hidden / len(hidden))
    assert not model.q._forward_pre_hooks  # the hooks are gone
    with pytest.raises(ValueError, match="layer 'v' received no input"):
        input_grams(model, {"v": model.v}, lambda m: None)


def test_input_grams_report_the_call_order_grouped_by_shared_input():
    model = Attention()
    groups = []
    input_grams(model, {"out": model.out, "v": model.v, "q": model.q, "k": model.k},
                lambda m: [m(torch.randn(2, 16)) for _ in range(2)], groups)
    assert groups == [["q", "k", "v"], ["out"]]


def test_paired_moments_and_the_corrected_weight_give_the_least_squares_fit():
    torch.manual_seed(0)
    reference = Attention()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model.q.weight.mul_(0.5)  # an earlier layer replaced: the inputs of `out` change
    batches = [torch.randn(4, 16) for _ in range(50)]
    moments = paired_moments(reference, model, ["q", "out"], lambda m: [m(b) for b in batches])
    x = torch.cat(batches).double()
    torch.testing.assert_close(moments["q"][0], x.T @ x / len(x))  # same inputs: cross = gram
    torch.testing.assert_close(moments["q"][1], x.T @ x / len(x))
    with torch.no_grad():
        hidden = torch.cat([reference.q(b) * reference.k(b) + reference.v(b) for b in batches]).double()
        changed = torch.cat([model.q(b) * model.k(b) + model.v(b) for b in batches]).double()
    torch.testing.assert_close(moments["out"][0], hidden.T @ changed / len(x))
    torch.testing.assert_close(moments["out"][1], changed.T @ changed / len(x))
    weight = reference.out.weight.detach().double()
    q_weight = reference.q.weight.detach().double()
    torch.testing.assert_close(corrected_weight(q_weight, *moments["q"]), q_weight)  # nothing to correct
    best = torch.linalg.lstsq(changed, hidden @ weight.T).solution.T  # min ||changed W'^T - hidden W^T||
    corrected = corrected_weight(weight, *moments["out"], damping=1e-12)
    torch.testing.assert_close(corrected, best, rtol=1e-6, atol=1e-8)
    assert not model.out._forward_pre_hooks and not reference.out._forward_pre_hooks
    with pytest.raises(ValueError, match="cross must be 8x8"):
        corrected_weight(weight, moments["q"][0], moments["out"][1])


def test_sequential_fits_make_up_for_earlier_layers_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 32))
    x = _anisotropic_inputs(3000, 64, seed=4)
    calibrate = lambda m: m(x)  # noqa: E731

    for family in ("lowrank", "gblr"):
        one_shot, sequential = copy.deepcopy(model), copy.deepcopy(model)
        compress_(one_shot, family, 0.3, options={"steps": 0} if family == "gblr" else None, calibration_inputs=calibrate)
        result = compress_(sequential, family, 0.3, options={"steps": 0} if family == "gblr" else None,
                           calibration_inputs=calibrate, sequential=True)
        assert [r.name for r in result.conversion.replaced] == ["0", "2", "4"]
        assert result.reached <= 0.3
        errors = [_output_error_against(model, m, x) for m in (sequential, one_shot)]
        assert errors[0] < 0.99 * errors[1], errors  # 0.135 against 0.139 for low-rank
    with pytest.raises(ValueError, match="sequential=True fits the layers' outputs: it needs calibration_inputs"):
        compress_(copy.deepcopy(model), "lowrank", 0.3, sequential=True)


def test_refitting_kept_dense_layers_makes_up_for_the_replaced_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 32))
    x = _anisotropic_inputs(3000, 64, seed=4)
    calibrate = lambda m: m(x)  # noqa: E731
    allocation = {"0": 0.2, "2": 1.0, "4": 1.0}  # only the first layer replaced

    compressed = {}
    for refit in (False, True):
        compressed[refit] = copy.deepcopy(model)
        result = compress_(compressed[refit], "lowrank", 0.2, allocation=allocation, calibration_inputs=calibrate,
                           sequential=True, refit_kept=refit)
        assert [r.name for r in result.conversion.replaced] == ["0"]
        assert isinstance(compressed[refit][2], nn.Linear) and isinstance(compressed[refit][4], nn.Linear)
    assert torch.equal(compressed[False][4].weight, model[4].weight)
    assert not torch.equal(compressed[True][4].weight, model[4].weight)
    assert torch.equal(compressed[True][4].bias, model[4].bias)
    errors = [_output_error_against(model, compressed[refit], x) for refit in (True, False)]
    assert errors[0] < errors[1], errors  # 0.1384 against 0.1399
    with pytest.raises(ValueError, match="refit_kept must be True or False and needs sequential=True"):
        compress_(copy.deepcopy(model), "lowrank", 0.3, allocation=allocation, calibration_inputs=calibrate,
                  refit_kept=True)


def test_output_fit_of_low_rank_is_the_whitened_truncated_svd():
    torch.manual_seed(0)
    weight = torch.randn(24, 40, dtype=torch.float64)
    x = _anisotropic_inputs(2000, 40, seed=1).double()
    gram = x.T @ x / len(x)
    by_weights = structured_from_dense("lowrank", weight, 0.3)
    by_outputs = structured_from_dense("lowrank", weight, 0.3, gram=gram)
    assert by_outputs.rank == by_weights.rank
    whitened = weight @ torch.linalg.cholesky(damped(gram))
    singular = torch.linalg.svdvals(whitened)
    optimum = float(singular[by_outputs.rank :].square().sum().sqrt() / singular.square().sum().sqrt())
    assert output_error(by_outputs.to_dense(), weight, damped(gram)) == pytest.approx(optimum, rel=1e-9)
    assert output_error(by_outputs.to_dense(), weight, gram) < 0.7 * output_error(by_weights.to_dense(), weight, gram)


def test_output_fit_of_gblr_is_never_worse_than_low_rank_and_keeps_the_budget():
    torch.manual_seed(0)
    weight = torch.randn(48, 64, dtype=torch.float64) / 8
    x = _anisotropic_inputs(3000, 64, seed=2).double()
    gram = x.T @ x / len(x)
    lowrank = structured_from_dense("lowrank", weight, 0.3, gram=gram)
    gblr = fit_gblr(weight, 0.3, gram=gram, steps=0)
    assert gblr.relative_cost() <= 0.3
    assert output_error(gblr.to_dense(), weight, damped(gram)) <= output_error(lowrank.to_dense(), weight, damped(gram)) + 1e-9
    weights_fit = fit_gblr(weight, 0.3, steps=0)
    held_out = _anisotropic_inputs(6000, 64, seed=2)[3000:].double()  # same feature scales, unseen samples
    with torch.no_grad():
        errors = [float(((layer.to_dense() - weight) @ held_out.T).norm() / (weight @ held_out.T).norm())
                  for layer in (gblr, weights_fit)]
    assert errors[0] < 0.8 * errors[1]  # the gain holds on inputs the fit never saw
    with pytest.raises(ValueError, match="gram must be 64x64"):
        fit_gblr(weight, 0.3, gram=gram[:10, :10], steps=0)


def test_convert_and_compress_fit_outputs_when_given_calibration_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    x = _anisotropic_inputs(2000, 64, seed=3)

    def calibrate(m):
        m(x)

    grams = input_grams(model, {"0": model[0], "2": model[2]}, calibrate)
    converted = copy.deepcopy(model)
    report = convert_(converted, ConvertConfig("lowrank", 0.4), grams=grams)
    assert all(r.output_error is not None and r.output_error < r.relative_error for r in report.replaced)
    assert "output error" in report.to_markdown()
    for bad, message in (({"9": grams["0"]}, "'9' is not a selected linear layer"),):
        with pytest.raises(ValueError, match=message):
            convert_(copy.deepcopy(model), ConvertConfig("lowrank", 0.4), grams=bad)
    with pytest.raises(ValueError, match="need init='dense'"):
        convert_(copy.deepcopy(model), ConvertConfig("lowrank", 0.4, init="random"), grams=grams)
    with pytest.raises(ValueError, match="available for gblr, lowrank, not monarch"):
        compress_(copy.deepcopy(model), "monarch", 0.5, calibration_inputs=calibrate)

    for allocation in ("uniform", "global"):
        by_weights, by_outputs = copy.deepcopy(model), copy.deepcopy(model)
        compress_(by_weights, "gblr", 0.4, allocation, options={"steps": 0})
        result = compress_(by_outputs, "gblr", 0.4, allocation, options={"steps": 0}, calibration_inputs=calibrate)
        assert result.reached <= 0.4
        errors = [_output_error_against(model, m, x) for m in (by_outputs, by_weights)]
        assert errors[0] < 0.8 * errors[1], errors


def test_compress_command_refuses_an_output_fit_for_families_without_one(tmp_path, capsys):
    assert main(["compress", "--model", "minilm", "--family", "monarch", "--fit", "outputs",
                 "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "--fit outputs is available for gblr, lowrank; use --fit weights for monarch" in error
    assert not (tmp_path / "out").exists()


def test_finer_tilings_are_refitted_under_the_correlations_between_column_tiles():
    generator = torch.Generator().manual_seed(3)
    weight = torch.block_diag(torch.randn(24, 32, generator=generator, dtype=torch.float64),
                              torch.randn(24, 32, generator=generator, dtype=torch.float64))
    weight += 0.3 * torch.randn(48, 64, generator=generator, dtype=torch.float64)  # every tile holds some energy
    mixing = torch.randn(64, 64, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, 64, dtype=torch.float64)
    x = torch.randn(4000, 64, generator=generator, dtype=torch.float64) @ mixing  # columns correlated across tiles
    gram = damped(x.T @ x / len(x))
    tiling = _TilePieces(weight, 4, gram)
    errors = [output_error(tiling.layer(0.3, torch.float64, sweeps=sweeps).to_dense(), weight, gram) for sweeps in (0, 1, 4)]
    assert errors[0] > errors[1] >= errors[2] and errors[2] < 0.97 * errors[0]  # each round lowers the error
    assert tiling.layer(0.3, torch.float64, sweeps=4).relative_cost() <= 0.3
    fitted = fit_gblr(weight, 0.3, gram=x.T @ x / len(x), steps=0)
    lowrank = structured_from_dense("lowrank", weight, 0.3, gram=x.T @ x / len(x))
    assert fitted.fit_method != "block-low-rank 1x1"
    assert output_error(fitted.to_dense(), weight, gram) < 0.95 * output_error(lowrank.to_dense(), weight, gram)


@pytest.mark.parametrize("shape", [(3, 40, 12), (3, 12, 40)])
def test_leading_pieces_are_the_truncated_svd(shape):
    from gblr.fit import _leading_pieces
    tiles = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    left, energy, right = _leading_pieces(tiles, 5)
    u, s, vh = torch.linalg.svd(tiles, full_matrices=False)
    assert torch.allclose(energy, s[:, :5].pow(2))
    assert torch.allclose(left @ right, (u[..., :5] * s[:, None, :5]) @ vh[:, :5])
    whole_left, whole_energy, whole_right = _leading_pieces(tiles)
    assert torch.allclose(whole_left @ whole_right, tiles) and torch.allclose(whole_energy.sum(-1), tiles.pow(2).sum((1, 2)))


def test_refit_handles_tiles_of_unequal_heights_and_ranks():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(50, 62, generator=generator, dtype=torch.float64)  # 13/12-row bands, 16/15-column tiles
    x = torch.randn(3000, 62, generator=generator, dtype=torch.float64) @ torch.randn(62, 62, generator=generator, dtype=torch.float64)
    gram = damped(x.T @ x / len(x))
    tiling = _TilePieces(weight, 4, gram)
    greedy, refitted = (tiling.layer(0.4, torch.float64, sweeps=sweeps) for sweeps in (0, 3))
    assert refitted.out_factors.shape == greedy.out_factors.shape  # the same tiles and ranks
    assert output_error(refitted.to_dense(), weight, gram) < 0.97 * output_error(greedy.to_dense(), weight, gram)
