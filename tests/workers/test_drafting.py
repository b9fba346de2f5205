"""Batched drafting over the paged drafter cache proposes exactly what the single-request
drafting session proposes, for every drafter, in a batch of requests of different lengths."""

from __future__ import annotations

import drafter_oracle
import pytest
import torch

from dspark.kernels import paged_attention
from dspark.workers.block_manager import BlockManager
from dspark.workers.drafting import DraftWorker, ExtendBatch


@pytest.mark.parametrize("group_rows,parts", [(paged_attention.GROUP_ROWS, 1), (0, 1),
                                              (paged_attention.GROUP_ROWS, 2)])
@pytest.mark.parametrize("method", ["dspark", "dflash", "eagle3", "mtp"])
def test_batched_proposals_equal_single_request_sessions(make_model, make_drafter, method,
                                                         monkeypatch, group_rows, parts):
    # NOTE: group_rows 0 attends each query length apart (EAGLE-3 and MTP-1 extend through
    # the paged attention); parts 2 writes each prompt in two extends, so the second reads
    # keys and values the first wrote for pairs whose output it never computed
    monkeypatch.setattr(paged_attention, "GROUP_ROWS", group_rows)
    target = make_model()
    drafter = make_drafter(target, method)
    cfg = drafter.config
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 97, (n,), generator=gen).tolist() for n in (11, 4, 17)]
    anchors = [7, 8, 9]  # the token after each prompt (as if sampled)
    blocks = BlockManager(64, 4)
    worker = DraftWorker(drafter, 64, 4)
    rows, next_ids, positions, cu, tables = [], [], [], [0], []
    expected = []
    for i, (prompt, anchor) in enumerate(zip(prompts, anchors)):
        out = target(torch.tensor([prompt]), feature_layers=cfg.feature_layers)
        feats = drafter_oracle.drafter_features(out, drafter)[0]  # [n, F]
        session = drafter_oracle.new_session(drafter)
        session.extend(feats, prompt[1:] + [anchor])
        expected.append(session.propose(anchor, 0.0, None, cfg.block_size))
        blocks.allocate(str(i), prompt + [anchor] + [0] * cfg.block_size)
        rows.append(feats)
        next_ids += prompt[1:] + [anchor]
        positions += range(len(prompt))
        cu.append(cu[-1] + len(prompt))
        tables.append(blocks.table(str(i)).block_ids)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    req_ids = [str(i) for i in range(len(prompts))]
    cuts = [[len(p) * k // parts for k in range(parts + 1)] for p in prompts]
    for k in range(parts):  # each request's rows [cut_k, cut_k+1) in the k-th extend
        spans = [(cu[r] + c[k], cu[r] + c[k + 1]) for r, c in enumerate(cuts)]
        take = torch.tensor([i for a, b in spans for i in range(a, b)])
        lens = [b - a for a, b in spans]
        worker.extend(ExtendBatch(req_ids, torch.cat(rows)[take], torch.tensor(next_ids)[take],
                                  torch.tensor(positions)[take],
                                  torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()]),
                                  table, lens))
    got = worker.propose(req_ids, torch.tensor(anchors), torch.tensor([len(p) for p in prompts]),
                         table, cfg.block_size, torch.zeros(3), torch.zeros(3, cfg.block_size))
    for r, want in enumerate(expected):
        assert got.tokens[r].tolist() == want.tokens
        torch.testing.assert_close(got.probs[r], want.probs)
        if want.conf_logits is not None:
            torch.testing.assert_close(got.conf_logits[r], want.conf_logits, atol=1e-5, rtol=1e-4)



@pytest.mark.parametrize("method, temperature", [("dspark", 0.0), ("dspark", 1.0),
                                                 ("dflash", 1.0)])
def test_drafting_in_a_draft_vocabulary_follows_the_slot_by_slot_definition(
        make_model, make_drafter, method, temperature):
    """Each slot draws among the draft vocabulary (in rank order) from the LM head's logits
    plus the Markov bias of the token before it, whose embedding is its own even when the
    anchor lies outside the vocabulary; q is zero outside it."""
    from dspark.kernels.markov_sample import markov_sample
    from dspark.models.generation import inverse_cdf
    from dspark.workers.draft_vocab import DraftVocab

    target = make_model()
    drafter = make_drafter(target, method)
    size = drafter.config.vocab_size
    drafter.token_ranking = torch.randperm(size, generator=torch.Generator().manual_seed(4))
    vocab = DraftVocab.of(drafter, size // 3)
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(3, 5, drafter.config.hidden_size, generator=gen)
    anchors = torch.tensor([int(vocab.ids[0]), int(drafter.token_ranking[-1]), 3])
    temps, uniforms = torch.full((3,), temperature), torch.rand(3, 5, generator=gen)
    markov = drafter.markov
    with torch.no_grad():
        w1, prev = vocab.markov_rows(anchors) if markov is not None else (None, anchors)
        tokens, probs = markov_sample(torch.nn.functional.linear(h, vocab.head), prev, w1,
                                      vocab.w2, temps, uniforms)
        tokens, probs = vocab.ids[tokens], vocab.full(probs)
        base = drafter.lm_head(h)
        for r in range(3):
            before = int(anchors[r])
            for k in range(5):
                logits = base[r, k].clone()
                if markov is not None:
                    logits += markov.w2(markov.w1(torch.tensor(before)))
                sub = logits[vocab.ids]
                if temperature == 0.0:
                    want = int(vocab.ids[sub.argmax()])
                else:
                    q = torch.softmax(sub / temperature, -1)
                    want = int(vocab.ids[inverse_cdf(q[None], uniforms[r, k : k + 1])[0]])
                    torch.testing.assert_close(probs[r, k, vocab.ids], q)
                assert int(tokens[r, k]) == want
                before = want
    outside = torch.ones(size, dtype=torch.bool)
    outside[vocab.ids] = False
    assert torch.all(probs[..., outside] == 0)
