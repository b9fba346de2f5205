"""Batched rejection sampling over a flattened, variable-length verify batch.

Vocabulary (per request r with ℓ_r verified drafts):
- *accepted*: draft k survives iff ``u_k < min(1, p_k(d_k) / q_k(d_k))`` and every earlier
  draft survived (greedy requests: iff it equals the target's argmax);
- *recovered token*: at the first rejection, a draw from ``normalize(max(p - q, 0))``;
- *bonus token*: when all ℓ_r drafts survive, a draw from the target at position ℓ_r.

Every request draws from its own ``torch.Generator`` in a fixed order (ℓ_r uniforms, then
one token), exactly as the single-request ``dspark.models.speculative.rejection_sample``
does, so a seeded request reproduces whatever batch it runs in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dspark.kernels.accept import accepted_lengths


@dataclass
class RejectionOutput:
    num_accepted: list[int]  # per request
    output_ids: list[list[int]]  # per request: accepted drafts + recovered/bonus token


def rejection_sample_batch(
    draft_ids: torch.Tensor,  # [num_draft_tokens] flattened drafts of all requests
    cu_num_draft: torch.Tensor,  # [R + 1] cumulative ℓ_r
    draft_probs: torch.Tensor,  # [num_draft_tokens, V] distribution each draft came from
    target_probs: torch.Tensor,  # [num_draft_tokens + R, V] ℓ_r + 1 rows per request
    greedy: Sequence[bool],  # [R]
    generators: Sequence[torch.Generator | None],  # [R]
) -> RejectionOutput:
    num_req = cu_num_draft.numel() - 1
    if len(greedy) != num_req or len(generators) != num_req:
        raise ValueError("greedy and generators need one entry per request")
    device = target_probs.device
    lens = (cu_num_draft[1:] - cu_num_draft[:-1]).tolist()
    # target rows of request r start at cu_num_draft[r] + r
    target_start = [int(c) + r for r, c in enumerate(cu_num_draft[:-1].tolist())]
    # p(d_k) and q(d_k) for every draft at once: [num_draft_tokens]
    req_of = torch.repeat_interleave(
        torch.arange(num_req, device=device), torch.tensor(lens, dtype=torch.long, device=device)
    )
    target_row = torch.arange(draft_ids.numel(), device=device) + req_of
    p_draft = target_probs[target_row, draft_ids]
    q_draft = draft_probs[torch.arange(draft_ids.numel(), device=device), draft_ids]
    ratio = torch.clamp(p_draft / q_draft.clamp_min(1e-8), max=1.0)  # [num_draft_tokens]
    argmax = target_probs.argmax(-1)  # [num_draft_tokens + R]
    is_greedy = torch.tensor(list(greedy), dtype=torch.bool, device=device)[req_of]
    # greedy requests: accept iff the draft is the argmax (uniform 0 < ratio 1)
    ratio = torch.where(is_greedy, (draft_ids == argmax[target_row]).float(), ratio)
    # NOTE: every request draws from its own CPU generator, in a fixed order
    uniforms = [
        torch.zeros(n) if greedy[r] else torch.rand(n, generator=generators[r])
        for r, n in enumerate(lens)
    ]
    uniforms = torch.cat(uniforms).to(device) if uniforms else torch.zeros(0, device=device)
    accepted = accepted_lengths(ratio, uniforms, cu_num_draft.to(device)).tolist()
    draft_list, argmax_list = draft_ids.tolist(), argmax.tolist()
    out_accepted, out_ids = [], []
    for r in range(num_req):
        first, n, t0, a = int(cu_num_draft[r]), lens[r], target_start[r], accepted[r]
        drafts = draft_list[first : first + n]
        if greedy[r]:
            token = argmax_list[t0 + a]
        else:
            if a == n:
                dist = target_probs[t0 + n]
            else:
                dist = (target_probs[t0 + a] - draft_probs[first + a]).clamp_min(0.0)
                if float(dist.sum()) <= 1e-8:
                    dist = target_probs[t0 + a]
            dist = dist.float().cpu()
            token = int(torch.multinomial(dist / dist.sum(), 1, generator=generators[r]))
        out_accepted.append(a)
        out_ids.append(drafts[:a] + [token])
    return RejectionOutput(out_accepted, out_ids)
