"""``models/linear.py``: a few rows on the CPU take ``W @ x^T``, everything else
``F.linear``; both give ``F.linear``'s result up to rounding, in its shape, with gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dspark.models.linear import SMALL_ROWS, Linear, linear


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


@pytest.mark.parametrize("lead", [(1,), (2,), (5,), (3, 7), (32,), (33,), (4, 40), (0,)])
def test_equals_f_linear_in_every_shape(lead):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 24, generator=gen)
    x = torch.randn(*lead, 24, generator=gen)
    out = linear(x, weight)
    assert out.shape == (*lead, 48) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_a_few_rows_take_the_weight_as_left_operand_and_others_do_not():
    weight = torch.randn(48, 24)
    seen = {}
    for rows in (1, SMALL_ROWS[0], 7, SMALL_ROWS[1], SMALL_ROWS[1] + 1):
        with Products() as mode:
            linear(torch.randn(rows, 24), weight)
        seen[rows] = [shapes[0] for _, shapes in mode.calls]
    # the weight [48, 24] is the first operand exactly where the rows are few
    assert [rows for rows, firsts in seen.items() if (48, 24) in firsts] == [
        SMALL_ROWS[0], 7, SMALL_ROWS[1]]


def test_the_module_keeps_nn_linear_state_and_gradients():
    torch.manual_seed(0)
    layer, plain = Linear(24, 48, bias=False), torch.nn.Linear(24, 48, bias=False)
    plain.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == ["weight"]
    x = torch.randn(5, 24, requires_grad=True)
    layer(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    plain(ref).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    biased = Linear(24, 48)  # a bias keeps F.linear
    torch.testing.assert_close(biased(x), F.linear(x, biased.weight, biased.bias))
