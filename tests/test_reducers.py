from __future__ import annotations

import pytest
import torch

from export.model.reducers import PromptTopKReducer, make_reducer, pool_matrix, resolve_budget
from sdk.errors import ExportError


@pytest.mark.parametrize("budget,n,k", [("full", 576, 576), ("half", 576, 288), ("half", 49, 25), ("quarter", 576, 144),
                                        (10, 49, 10), ("7", 49, 7)])
def test_resolve_budget(budget, n, k):
    assert resolve_budget(budget, n) == k


@pytest.mark.parametrize("budget", ["most", 0, 50, -1, None])
def test_bad_budget_is_refused(budget):
    with pytest.raises(ExportError):
        resolve_budget(budget, 49)


@pytest.mark.parametrize("h,w,k", [(24, 24, 288), (24, 24, 144), (7, 7, 25), (7, 7, 13), (16, 16, 128), (5, 3, 7)])
def test_pool_matrix_averages_disjoint_cells_covering_every_patch(h, w, k):
    m = pool_matrix(h, w, k)
    assert m.shape == (k, h * w)
    torch.testing.assert_close(m.sum(1), torch.ones(k))  # each output is an average
    assert ((m > 0).sum(0) == 1).all()  # every patch in exactly one cell


def test_quarter_budget_pools_2x2_squares():
    m = pool_matrix(24, 24, 144)
    first = m[0].nonzero().flatten().tolist()
    assert first == [0, 1, 24, 25]


def test_prompt_topk_keeps_the_most_attended_patches_in_original_order():
    tokens = torch.arange(10.0).view(1, 10, 1).expand(2, 10, 3)
    attention = torch.tensor([[0, 9, 1, 8, 2, 7, 3, 6, 4, 5], [9, 0, 0, 0, 0, 0, 0, 0, 8, 7]], dtype=torch.float)
    out = PromptTopKReducer(2, 5, 3)(tokens, attention)
    assert out[0, :, 0].tolist() == [1, 3, 5]
    assert out[1, :, 0].tolist() == [0, 8, 9]


def test_unknown_reducer_is_refused():
    with pytest.raises(ExportError, match="pool"):
        make_reducer("magic", 7, 7, 25)
