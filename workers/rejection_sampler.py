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
from dspark.models.generation import inverse_cdf


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
    accepted_t = accepted_lengths(ratio, uniforms, cu_num_draft.to(device))  # [R]
    # the recovered (first rejection) or bonus (all accepted) token of every request
    starts = torch.tensor(target_start, dtype=torch.long, device=device)
    dist = target_probs[starts + accepted_t].float()  # [R, V]
    rejected = accepted_t < torch.tensor(lens, device=device)  # [R]
    if draft_ids.numel():
        q_rows = (cu_num_draft[:-1].to(device) + accepted_t).clamp_max(draft_ids.numel() - 1)
        residual = (dist - draft_probs[q_rows].float()).clamp_min(0.0)
        # p == q up to rounding leaves nothing to correct: draw from p
        usable = residual.sum(-1, keepdim=True) > 1e-8
        dist = torch.where(rejected[:, None] & usable, residual, dist)
    # NOTE: one uniform per sampled request, after its ℓ_r acceptance uniforms
    draws = torch.stack([
        torch.zeros(()) if greedy[r] else torch.rand((), generator=generators[r])
        for r in range(num_req)
    ]) if num_req else torch.zeros(0)
    tokens = torch.where(
        torch.tensor(list(greedy), dtype=torch.bool, device=device),
        argmax[starts + accepted_t],
        inverse_cdf(dist, draws.to(device)),
    ).tolist()
    accepted = accepted_t.tolist()
    draft_list, cu = draft_ids.tolist(), cu_num_draft.tolist()
    out_ids = [draft_list[cu[r] : cu[r] + accepted[r]] + [tokens[r]] for r in range(num_req)]
    return RejectionOutput(accepted, out_ids)
