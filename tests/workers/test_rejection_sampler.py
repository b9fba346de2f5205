"""The batched rejection sampler equals the single-request sampler request by request."""

from __future__ import annotations

import torch

from dspark.models.speculative import rejection_sample
from dspark.workers.rejection_sampler import rejection_sample_batch


def random_batch(lens, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    draft_probs = torch.softmax(torch.randn(total, vocab, generator=gen) * 2, -1)
    target_probs = torch.softmax(torch.randn(total + len(lens), vocab, generator=gen) * 2, -1)
    draft_ids = torch.multinomial(draft_probs, 1, generator=gen).squeeze(-1)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    return draft_ids, cu, draft_probs, target_probs


def test_batch_equals_single_request_sampling_with_the_same_seeds():
    lens = [7, 0, 3, 5, 1]
    greedy = [False, False, True, False, False]
    for trial in range(30):
        draft_ids, cu, q, p = random_batch(lens, 11, trial)
        gens = [torch.Generator().manual_seed(100 * trial + r) for r in range(len(lens))]
        out = rejection_sample_batch(draft_ids, cu, q, p, greedy, gens)
        for r, n in enumerate(lens):
            first, t0 = int(cu[r]), int(cu[r]) + r
            gen = torch.Generator().manual_seed(100 * trial + r)
            drafts = draft_ids[first : first + n].tolist()
            a, tok = rejection_sample(
                drafts, q[first : first + n], p[t0 : t0 + n + 1], gen, greedy[r]
            )
            assert out.num_accepted[r] == a
            assert out.output_ids[r] == drafts[:a] + [tok]


def test_greedy_requests_accept_exactly_the_argmax_prefix():
    p = torch.eye(5)[[1, 2, 3, 4]]  # target argmax: 1, 2, 3, then bonus 4
    draft = torch.tensor([1, 2, 0])
    q = torch.eye(5)[draft]
    out = rejection_sample_batch(draft, torch.tensor([0, 3]), q, p, [True], [None])
    assert out.num_accepted == [2] and out.output_ids == [[1, 2, 3]]
    draft = torch.tensor([1, 2, 3])
    out = rejection_sample_batch(
        draft, torch.tensor([0, 3]), torch.eye(5)[draft], p, [True], [None]
    )
    assert out.num_accepted == [3] and out.output_ids == [[1, 2, 3, 4]]
