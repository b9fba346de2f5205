"""Accepted-prefix lengths of a flattened verify batch (the rejection sampler's accept step).

For request r with drafts in ``[cu[r], cu[r + 1])``, draft k survives iff
``uniforms[k] < ratio[k]`` (ratio = min(1, p/q); greedy requests pass uniforms 0 and a
ratio of 1 for a draft equal to the target's argmax, else 0) and every earlier draft of r
survived. The result is the number of surviving drafts per request.

``accepted_lengths_torch`` is the oracle and the CPU path; ``accepted_lengths_triton`` is
the GPU kernel (one program per request), tested against the twin under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; the twin needs nothing
    triton = None


def accepted_lengths_torch(
    ratio: torch.Tensor,  # [num_draft_tokens] float
    uniforms: torch.Tensor,  # [num_draft_tokens] float
    cu_num_draft: torch.Tensor,  # [R + 1] int64
) -> torch.Tensor:  # [R] int64
    num_req = cu_num_draft.numel() - 1
    lens = cu_num_draft[1:] - cu_num_draft[:-1]  # [R]
    width = int(lens.max()) if num_req else 0
    ok = uniforms < ratio  # [N]
    padded = torch.zeros(num_req, max(width, 1), dtype=torch.long, device=ratio.device)
    req_of = torch.repeat_interleave(torch.arange(num_req, device=ratio.device), lens)
    pos = torch.arange(ok.numel(), device=ratio.device) - cu_num_draft[:-1][req_of]
    padded[req_of, pos] = ok.long()
    return padded.cumprod(-1).sum(-1)


if triton is not None:

    @triton.jit
    def _accept_kernel(ratio_ptr, uniform_ptr, cu_ptr, out_ptr, BLOCK: tl.constexpr):
        req = tl.program_id(0)
        start = tl.load(cu_ptr + req)
        end = tl.load(cu_ptr + req + 1)
        num = end - start
        offs = tl.arange(0, BLOCK)
        inside = offs < num
        u = tl.load(uniform_ptr + start + offs, mask=inside, other=1.0)
        r = tl.load(ratio_ptr + start + offs, mask=inside, other=0.0)
        rejected = (u >= r) | (offs >= num)
        first = tl.min(tl.where(rejected, offs, BLOCK), axis=0)
        tl.store(out_ptr + req, tl.minimum(first, num))


def accepted_lengths_triton(
    ratio: torch.Tensor, uniforms: torch.Tensor, cu_num_draft: torch.Tensor,
    width: int | None = None,  # the most drafts of one request, where known on the host
) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed")
    num_req = cu_num_draft.numel() - 1
    out = torch.empty(num_req, dtype=torch.int64, device=ratio.device)
    if num_req == 0:
        return out
    if width is None:  # NOTE: a read-back (a sync on a GPU)
        width = int((cu_num_draft[1:] - cu_num_draft[:-1]).max())
    block = max(16, triton.next_power_of_2(max(width, 1)))
    _accept_kernel[(num_req,)](
        ratio.float().contiguous(),
        uniforms.float().contiguous(),
        cu_num_draft.to(torch.int64).contiguous(),
        out,
        BLOCK=block,
    )
    return out


def accepted_lengths(
    ratio: torch.Tensor, uniforms: torch.Tensor, cu_num_draft: torch.Tensor,
    width: int | None = None,
) -> torch.Tensor:
    """The kernel on CUDA tensors, the torch twin elsewhere. ``width``: the most drafts
    of one request, where the caller knows it (the kernel then reads nothing back)."""
    if ratio.is_cuda and triton is not None:
        return accepted_lengths_triton(ratio, uniforms, cu_num_draft, width)
    return accepted_lengths_torch(ratio, uniforms, cu_num_draft)
