"""A GBLR layer trained on data from a hidden matrix, with the budget set to that matrix's cost, recovers it."""

import pytest

from gblr.demos.hidden_structure import recover


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["block_sparse", "low_rank"])
def test_recovers_hidden_structure(kind):
    result = recover(kind, seed=0, steps=3000)
    assert result.relative_error < 0.05, result
    assert abs(result.learned_cost - result.hidden_cost) <= 0.05 * result.hidden_cost, result
