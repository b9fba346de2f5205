"""``row_argmax`` is ``torch.argmax(x, -1)`` index for index: ties, NaN, -inf, widths that
do not split into chunks, and few rows."""

from __future__ import annotations

import pytest
import torch

from dspark.kernels.row_argmax import row_argmax


@pytest.mark.parametrize("rows,width", [(16, 4096), (40, 4096), (33, 128), (20, 100), (3, 4096)])
def test_row_argmax_is_torch_argmax(rows, width):
    gen = torch.Generator().manual_seed(rows * width)
    x = torch.randn(rows, width, generator=gen)
    ties = torch.randint(0, 3, (rows, width), generator=gen).float()  # many equal maxima
    spread = x.clone()
    spread[:, -1] = spread.max() + 1  # the maximum in the last chunk
    spread[0, 5] = spread[0, width // 2] = spread.max() + 2  # two maxima in one row
    nan = x.clone()
    nan[1, width // 3] = nan[1, width - 2] = float("nan")
    neg = torch.full((rows, width), float("-inf"))
    for case in (x, ties, spread, nan, neg, -ties):
        assert torch.equal(row_argmax(case), case.argmax(-1))


def test_a_non_contiguous_view_is_read_as_it_is():
    x = torch.randn(4096, 32).t()  # [32, 4096], not contiguous
    assert torch.equal(row_argmax(x), x.argmax(-1))


def test_a_slot_of_a_block_of_logits_is_read_in_place():
    base = torch.randn(32, 7, 4096)
    slot = base[:, 3]  # [32, 4096], rows strided (the drafter's slot k)
    assert not slot.is_contiguous() and torch.equal(row_argmax(slot), slot.argmax(-1))
