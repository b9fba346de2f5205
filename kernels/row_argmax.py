"""The first index of each row's maximum, as ``torch.argmax(x, -1)`` returns it, faster on
wide rows: a CPU argmax over the vocabulary is a scalar loop (about ten times a max
reduction; ``python -m dspark.bench.host_ops`` times both), so the row is cut into
chunks, the chunk maxima are reduced (vectorized), and argmax runs over the chunk maxima
and inside the one chunk that holds the first maximum. Ties, NaN (argmax's maximum) and
rows of -inf give the same index as ``torch.argmax``: the first chunk holding the maximum,
then the first index inside it.
"""

from __future__ import annotations

import torch

CHUNK = 64
MIN_ROWS = 16
"""Below this many rows the extra ops cost more than the scalar loop saves."""


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x: [R, V] -> [R], equal to ``x.argmax(-1)``."""
    rows, width = x.shape
    if (rows < MIN_ROWS or width % CHUNK or width <= CHUNK or x.device.type != "cpu"
            or x.stride(-1) != 1):  # NOTE: a row-strided view splits its rows in place
        return x.argmax(-1)
    chunks = x.view(rows, width // CHUNK, CHUNK)
    # NOTE: argmax (not amax) of the chunk maxima: amax propagates NaN, argmax takes the
    # first NaN as the maximum, as torch.argmax does over the whole row
    best = chunks.amax(-1).argmax(-1)  # [R] the first chunk holding the maximum
    inner = chunks[torch.arange(rows, device=x.device), best].argmax(-1)  # [R]
    return best * CHUNK + inner
