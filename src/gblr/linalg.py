"""Linear algebra that every fit shares."""

from __future__ import annotations

import torch

__all__ = ["thin_svd"]


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)`` (batched too), retried on the transpose where
    LAPACK's divide-and-conquer SVD fails to converge: it does on rare, ordinary matrices (one 106 x 119
    window of a hidden-block fit, singular values 49 to 0.003, failed; its transpose did not)."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(matrix.mT, full_matrices=False)
        return vh.mT, s, u.mT
