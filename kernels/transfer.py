"""Host values to a device without waiting for it.

``torch.tensor(values, device="cuda")`` and ``host_tensor.to("cuda")`` copy from pageable
host memory, and torch makes such a copy wait for everything queued on the stream
(``cudaMemcpyAsync`` then ``cudaStreamSynchronize``). A step that builds its index tensors
that way stops the host at each one until the GPU has caught up, so the host's Python and
the GPU's kernels take turns instead of overlapping. Here the values go through pinned
memory with ``non_blocking=True``: the copy is queued on the current stream like a kernel,
ordered before every later kernel that reads it, and torch's pinned-memory cache keeps the
host buffer until the copy has run. On other devices these are the plain calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def device_tensor(values: Sequence | float | int, device: torch.device | str,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without a wait on a CUDA
    device."""
    kind = _kind(device)
    if kind == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=kind == "cuda").to(
        device, non_blocking=True)


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` (``host.to(device)``) without a wait on a CUDA device
    (``pin_memory`` copies it first, so the caller may write ``host`` afterwards)."""
    if _kind(device) != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _kind(device: torch.device | str) -> str:
    return (device if isinstance(device, torch.device) else torch.device(device)).type
