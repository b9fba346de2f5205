"""``models/linear.py``: a few rows on the CPU take ``W @ x^T``, everything else
``F.linear``; both give ``F.linear``'s result up to rounding, in its shape, with gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dspark.models.linear import MIN_WIDENING, SMALL_ROWS, Linear, linear


class Products(TorchDispatchMode):
    """Records the operands' shapes of every ``aten.mm`` / ``aten.addmm`` / linear call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "linear", "matmul", "bmm"):
            self.calls.append((name, [tuple(a.shape) for a in args if torch.is_tensor(a)]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("out_width", [12, 48, 24 * MIN_WIDENING])
@pytest.mark.parametrize("lead", [(1,), (2,), (5,), (3, 7), (32,), (33,), (4, 40), (0,)])
def test_equals_f_linear_in_every_shape(lead, out_width):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_width, 24, generator=gen)
    x = torch.randn(*lead, 24, generator=gen)
    out = linear(x, weight)
    assert out.shape == (*lead, out_width) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)


def left_operand_rows(weight: torch.Tensor) -> list[int]:
    """The row counts at which ``linear`` takes ``weight`` as the first operand."""
    seen = {}
    for rows in (1, SMALL_ROWS[0], 7, SMALL_ROWS[1], SMALL_ROWS[1] + 1):
        with Products() as mode:
            linear(torch.randn(rows, weight.shape[1]), weight)
        seen[rows] = [shapes[0] for _, shapes in mode.calls]
    return [rows for rows, firsts in seen.items() if tuple(weight.shape) in firsts]


def test_a_few_rows_of_a_wide_product_take_the_weight_as_left_operand_and_others_do_not():
    assert left_operand_rows(torch.randn(24 * MIN_WIDENING, 24)) == [
        SMALL_ROWS[0], 7, SMALL_ROWS[1]]
    # narrower outputs (q/k/v-like, down projections) keep F.linear at every row count
    assert left_operand_rows(torch.randn(24 * MIN_WIDENING - 1, 24)) == []
    assert left_operand_rows(torch.randn(24, 96)) == []


def test_the_module_keeps_nn_linear_state_and_gradients():
    torch.manual_seed(0)
    layer, plain = Linear(24, 96, bias=False), torch.nn.Linear(24, 96, bias=False)
    plain.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == ["weight"]
    x = torch.randn(5, 24, requires_grad=True)
    layer(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    plain(ref).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    biased = Linear(24, 96)  # a bias keeps F.linear
    torch.testing.assert_close(biased(x), F.linear(x, biased.weight, biased.bias))
