"""The linear product every model here runs (target, drafters): ``x @ W^T``, computed on the
CPU for a few rows as ``(W @ x^T)^T``.

A verify forward of one request and its drafts, a draft block and a small decode batch feed
the model a few rows. For those, the CPU's BLAS (MKL under torch) computes ``x @ W^T``
through a path that, on this project's machines and with the weight coming from memory (as
it does in a step: the whole model passes through the caches between two uses of a layer),
cost far more from the second row on than its one-row path, although the arithmetic of 8
rows against a weight matrix is small next to reading the weight. The same product written as
``W @ x^T`` (the weight as the left operand, not transposed) takes another path that reads
the weight once for all rows; its result is transposed back into a contiguous ``[rows,
out]``. Measured by ``python -m dspark.bench.linear_paths`` (docs/engine.md, session 24).

Equal to ``F.linear`` up to rounding: the two paths sum the products in other orders (as
``F.linear`` itself does for one row against several). Losslessness does not depend on it:
the engine's greedy and T=1 contracts compare with a reference that runs the same models.
One row keeps ``F.linear`` (a matrix-vector product either way), and so do large batches
(prefill chunks, training), where the other path was no faster (64 rows) or slower; so do
narrow products (output less than ``MIN_WIDENING`` times the input: attention q/k/v, down
projections), which lost with ``W @ x^T`` at every row count, CUDA tensors and layers with
a bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_ROWS = (2, 32)
"""Row counts (inclusive) that take ``W @ x^T`` on the CPU."""

MIN_WIDENING = 4
"""Only products whose output is at least this many times as wide as their input take
``W @ x^T``: LM heads, the experts' and the drafter's gate and up projections, the draft
vocabulary head. Narrow ones (attention q/k/v, output and down projections) measured slower
that way at every row count, from memory as in cache (docs/engine.md, sessions 24-25)."""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., in], weight [out, in] -> [..., out]."""
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    if (bias is not None or x.device.type != "cpu" or weight.dim() != 2
            or weight.shape[0] < MIN_WIDENING * width
            or not SMALL_ROWS[0] <= rows <= SMALL_ROWS[1]):
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, width).t()).t().contiguous()  # [rows, out]
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict names) whose forward is ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
