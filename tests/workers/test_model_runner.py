"""The paged, flattened verify forward equals the plain forward; SPS(B) is profiled."""

from __future__ import annotations

import pytest
import torch

from dspark.kernels import paged_attention
from dspark.workers.block_manager import BlockManager
from dspark.workers.model_runner import ModelRunner, VerifyBatch, profile_step_costs


# NOTE: group_rows 0 splits the requests by query length (3 groups here); the default keeps
# these small batches in one padded group
@pytest.mark.parametrize("group_rows", [paged_attention.GROUP_ROWS, 0])
def test_chunked_paged_forward_equals_the_plain_forward(make_model, monkeypatch, group_rows,
                                                         verify_batch):
    monkeypatch.setattr(paged_attention, "GROUP_ROWS", group_rows)
    target = make_model()
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 97, (n,), generator=gen).tolist() for n in (5, 13, 9, 1)]
    blocks = BlockManager(64, 4)
    for i, s in enumerate(seqs):
        blocks.allocate(str(i), s)
    runner = ModelRunner(target, 64, 4, feature_layers=(0, 1))
    cut = [min(3, len(s) - 1) for s in seqs]
    runner.forward(verify_batch(blocks, seqs, [(0, c) if c else (0, 1) for c in cut]))
    spans = [(c, len(s)) if c else (0, 1) for s, c in zip(seqs, cut)]
    out = runner.forward(verify_batch(blocks, seqs, spans))
    row = 0
    for s, (a, b) in zip(seqs, spans):
        ref = target(torch.tensor([s]), feature_layers=(0, 1))
        n = b - a
        torch.testing.assert_close(out.logits[row:row + n], ref.logits[0, a:b])
        torch.testing.assert_close(out.features[row:row + n], ref.layer_features[0, a:b])
        row += n


def test_final_hidden_features_and_logits_at_chosen_rows(make_model):
    """MTP reads the final normed hidden; only the logit rows get logits."""
    target = make_model()
    seq = torch.randint(5, 97, (6,), generator=torch.Generator().manual_seed(1)).tolist()
    blocks = BlockManager(16, 4)
    blocks.allocate("0", seq)
    runner = ModelRunner(target, 16, 4)
    out = runner.forward(VerifyBatch(
        input_ids=torch.tensor(seq),
        positions=torch.arange(6),
        cu_q=torch.tensor([0, 6]),
        block_tables=torch.tensor([blocks.table("0").block_ids]),
        seq_lens=torch.tensor([6]),
        logit_rows=torch.tensor([2, 5]),
        q_lens=[6],
        key_lens=[6],
    ))
    ref = target(torch.tensor([seq]))
    assert out.features is None  # no feature layers asked
    torch.testing.assert_close(out.hidden, ref.hidden_states[0])
    torch.testing.assert_close(out.logits, ref.logits[0, [2, 5]])


def test_profile_gives_a_table_for_each_fitting_size(make_model):
    runner = ModelRunner(make_model(), 64, 4)
    table = profile_step_costs(runner, (1, 4, 16, 64, 4096), max_requests=8, context=8,
                               num_blocks=64, repeats=1)
    assert table.batch_sizes == (1, 4, 16, 64)  # 4096 tokens do not fit in 64 blocks
    assert all(rate > 0 for rate in table.steps_per_second)
