"""Shared linear algebra (gblr.linalg)."""

import torch

from gblr.fit import relative_error, structured_from_dense
from gblr.linalg import thin_svd


def fail_first_svds(monkeypatch, failures: int) -> list:
    """Make the first ``failures`` calls of ``torch.linalg.svd`` fail as LAPACK does; returns the shapes asked."""
    real, calls = torch.linalg.svd, []

    def failing(a, full_matrices=True):
        calls.append(tuple(a.shape))
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", failing)
    return calls


def test_thin_svd_retries_on_the_transpose_where_lapack_fails(monkeypatch):
    matrix = torch.randn(30, 20, dtype=torch.float64)
    calls = fail_first_svds(monkeypatch, 1)
    u, s, vh = thin_svd(matrix)
    assert calls == [(30, 20), (20, 30)]
    assert u.shape == (30, 20) and vh.shape == (20, 20)
    assert torch.allclose((u * s) @ vh, matrix, atol=1e-12)


def test_thin_svd_retries_batches_too(monkeypatch):
    matrices = torch.randn(3, 12, 7, dtype=torch.float64)
    calls = fail_first_svds(monkeypatch, 1)
    u, s, vh = thin_svd(matrices)
    assert calls == [(3, 12, 7), (3, 7, 12)]
    assert torch.allclose((u * s.unsqueeze(-2)) @ vh, matrices, atol=1e-12)


def test_a_low_rank_projection_survives_an_svd_that_fails_once(monkeypatch):
    weight = torch.randn(48, 32)
    expected = relative_error(structured_from_dense("lowrank", weight, 0.5).to_dense(), weight)
    calls = fail_first_svds(monkeypatch, 1)
    assert abs(relative_error(structured_from_dense("lowrank", weight, 0.5).to_dense(), weight) - expected) < 1e-5
    assert len(calls) >= 2
