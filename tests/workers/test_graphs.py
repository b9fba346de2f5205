"""Verify batches padded to a bucket (``workers/graphs.py``) give what the eager forward
gives: the same logits, hidden states, features and KV slots of every real row, the same
keys and values in every block a request owns, and the same greedy text through the
engine. On a GPU the captured graph replays it (``test_captured_graph_replays_the_eager_
forward``, skipped without CUDA; ``bench/gpu_check.sh`` runs it)."""

from __future__ import annotations

import os

import pytest
import torch

from dspark.bench.host_syncs import HOST_READS  # NOTE: reads a capture cannot hold
from dspark.models.generation import SamplingParams, generate_tokens
from dspark.workers.block_manager import BlockManager
from dspark.workers.budget import StepCostTable
from dspark.workers.drafting import DraftWorker, ExtendBatch
from dspark.workers.engine import Engine, EngineConfig, enable_graphs
from dspark.workers.graphs import Shape
from dspark.workers.model_runner import ModelRunner

NUM_BLOCKS, BLOCK = 64, 4


def two_runners(model, device="cpu", capture=False):
    """An eager runner and a padded one over the same target, each with its own cache."""
    eager = ModelRunner(model, NUM_BLOCKS, BLOCK, feature_layers=(0, 2))
    padded = ModelRunner(model, NUM_BLOCKS, BLOCK, feature_layers=(0, 2))
    padded.enable_graphs(max_requests=8, capture=capture)
    return eager, padded


def prefill(verify_batch, runners, blocks, seqs, upto):
    for runner in runners:
        out = runner.forward(verify_batch(blocks, seqs, [(0, n) for n in upto], False,
                                      runner.device))
        assert out.logits.shape[0] == sum(upto)  # NOTE: a prefill batch runs eagerly


def assert_same(a, b):
    # NOTE: other shapes, other kernels (on a GPU other reduction orders): equal to rounding
    tol = 1e-4 if a.logits.is_cuda else 1e-5
    for got, want in ((a.logits, b.logits), (a.hidden, b.hidden), (a.features, b.features)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(a.slots, b.slots)


@pytest.mark.parametrize("spans_after, extra_blocks", [
    ([1, 1, 1], 0),       # a decode step: every request one row, 3 of a 4-request bucket
    ([1, 4, 2], 0),       # a verify step: runs of 1, 4 and 2 rows padded to 4 each
    ([3, 1, 8], 5),       # a run of 8 rows; tables wider than the widest request needs
])
def test_padded_forward_equals_the_eager_forward(make_model, spans_after, extra_blocks, verify_batch):
    model = make_model(seed=3)
    for layer in model.model.layers:  # NOTE: the same expert path for both batch sizes
        layer.mlp.expert_path = "sparse"
    gen = torch.Generator().manual_seed(0)
    context = [9, 14, 5]
    seqs = [torch.randint(5, 97, (c + n,), generator=gen).tolist()
            for c, n in zip(context, spans_after)]
    blocks = BlockManager(NUM_BLOCKS, BLOCK)
    for i, s in enumerate(seqs):
        blocks.allocate(str(i), s)
    eager, padded = two_runners(model)
    prefill(verify_batch, (eager, padded), blocks, seqs, context)
    spans = [(c, c + n) for c, n in zip(context, spans_after)]
    batch = verify_batch(blocks, seqs, spans, True, extra_blocks=extra_blocks)
    want = eager.forward(batch)
    got = padded.forward(batch)
    assert padded.graphs.replays == 1 and len(padded.graphs.graphs) == 1
    shape = next(iter(padded.graphs.graphs))
    assert shape.requests == 4 and shape.queries == {1: 1, 4: 4, 8: 8}[max(spans_after)]
    assert_same(got, want)
    # every block a request owns holds the same keys and values; the padded rows wrote
    # the scratch block only
    owned = NUM_BLOCKS * BLOCK
    torch.testing.assert_close(padded.kv.k[:, :owned], eager.kv.k[:, :owned])
    torch.testing.assert_close(padded.kv.v[:, :owned], eager.kv.v[:, :owned])




@pytest.mark.parametrize("spans_after", [[1, 1, 1], [1, 4, 2], [8, 8, 8]])
def test_the_padded_forward_reads_nothing_back_from_the_host(make_model, monkeypatch,
                                                              spans_after, verify_batch):
    """What a CUDA graph captures (``GraphedForward._body``: the layout, the KV writes, the
    target's layers, experts dense and grouped) never reads a tensor's values on the host;
    here on the CPU, with every such read made to raise."""
    model = make_model(seed=3)
    seqs = [list(range(5, 5 + n)) for n in (12, 20, 7)]
    blocks = BlockManager(NUM_BLOCKS, BLOCK)
    for i, s in enumerate(seqs):
        blocks.allocate(str(i), s + [0] * 8)
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK, feature_layers=(0, 2))
    runner.enable_graphs(max_requests=8, capture=False)
    spans = [(len(s) - 1, len(s) - 1 + n) for s, n in zip(seqs, spans_after)]
    padded = [s + [9] * 8 for s in seqs]
    batch = verify_batch(blocks, padded, spans, True)
    shape = runner.graphs.shape(batch)
    runner.graphs._fill(batch, shape)

    def read(*args, **kwargs):
        raise AssertionError("a tensor read back on the host inside the captured region")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, read)
    with torch.no_grad():  # NOTE: as the runner calls it
        for _ in (0, 1):  # NOTE: the second call: every weight copy already cached
            runner.graphs._body(shape)
    monkeypatch.undo()
    assert shape.rows == 4 * max(spans_after)  # 3 requests in a bucket of 4


def test_batches_that_do_not_fit_a_bucket_run_eagerly(make_model, verify_batch):
    model = make_model(seed=3)
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK, feature_layers=(0,))
    runner.enable_graphs(max_requests=8, capture=False)
    graphs = runner.graphs
    seqs = [list(range(5, 30))]
    blocks = BlockManager(NUM_BLOCKS, BLOCK)
    blocks.allocate("0", seqs[0])
    assert graphs.shape(verify_batch(blocks, seqs, [(0, 20)], True)) is None  # 20 query rows
    assert graphs.shape(verify_batch(blocks, seqs, [(0, 3)], False)) is None  # a prefill
    assert graphs.shape(verify_batch(blocks, seqs, [(24, 25)], True)) == Shape(1, 1, 8)
    with pytest.raises(ValueError, match="cuda_graphs needs the target on a CUDA device"):
        runner.enable_graphs(8, capture=True)
    with pytest.raises(ValueError, match="cuda_graphs"):
        Engine(model, None, EngineConfig(cuda_graphs=True, block_size=4, num_blocks=64),
               StepCostTable((1, 8), (100.0, 90.0)))


@pytest.mark.parametrize("method, vocab, num", [
    ("dspark", 40, 3),     # a draft vocabulary (its Markov rows made anew), 3 slots
    ("dspark", 0, None),   # the whole vocabulary, every slot of the block
    ("dflash", 0, 5),      # no Markov head
])
def test_padded_drafting_equals_the_eager_call(make_model, make_drafter, method, vocab, num):
    """A drafter's call padded to its bucket (3 requests of a 4-request bucket, the
    widest context rounded up to a power of two of blocks) drafts what the eager call
    drafts: the same tokens, distributions and confidences, greedy and sampled rows."""
    target = make_model(seed=0)
    drafter = make_drafter(target, method)
    drafter.token_ranking = torch.randperm(97, generator=torch.Generator().manual_seed(2))
    worker = DraftWorker(drafter, NUM_BLOCKS, BLOCK, vocab=vocab)
    block = drafter.config.block_size
    num = num or block
    assert (worker.vocab is None) == (vocab == 0)
    gen = torch.Generator().manual_seed(4)
    contexts = [11, 4, 17]
    blocks = BlockManager(NUM_BLOCKS, BLOCK)
    rows, next_ids, positions, cu, tables = [], [], [], [0], []
    for i, n in enumerate(contexts):
        ids = torch.randint(5, 97, (n + 1,), generator=gen).tolist()
        out = target(torch.tensor([ids[:n]]), feature_layers=drafter.config.feature_layers)
        rows.append(out.layer_features[0])
        next_ids += ids[1:]
        positions += range(n)
        cu.append(cu[-1] + n)
        blocks.allocate(str(i), ids + [0] * block)
        tables.append(blocks.table(str(i)).block_ids)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    worker.extend(ExtendBatch([str(i) for i in range(3)], torch.cat(rows),
                              torch.tensor(next_ids), torch.tensor(positions),
                              torch.tensor(cu), table, contexts))
    args = (torch.tensor([7, 8, 9]), torch.tensor(contexts), table, num,
            torch.tensor([0.0, 1.0, 0.7]), torch.rand(3, block, generator=gen), None)
    want = worker.propose(["0", "1", "2"], *args)
    worker.enable_graphs(max_requests=8, capture=False)
    tokens, probs, conf = worker.graphs.propose(max(contexts), *args)
    assert worker.graphs.replays == 1
    assert next(iter(worker.graphs.graphs)) == Shape(4, 1, 8)
    assert torch.equal(tokens, want.tokens)
    torch.testing.assert_close(probs, want.probs, rtol=1e-5, atol=1e-6)
    if method == "dspark":
        torch.testing.assert_close(conf, want.conf_logits, rtol=1e-4, atol=1e-5)
    else:
        assert conf is None and want.conf_logits is None


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# NOTE: Triton's interpreter (the suite's default, tests/conftest.py) copies the drafter's
# Markov kernel's tensors to the host, which a capture cannot hold
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and compiled Triton kernels (TRITON_INTERPRET=0, as "
           "bench/gpu_check.sh runs it)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_greedy_text_is_the_same_with_padded_forwards(make_model, make_drafter, device):
    """The engine with speculation (a draft vocabulary), its decode and verify forwards
    and its drafting calls padded (on a GPU: replayed from captured graphs,
    ``EngineConfig.cuda_graphs``): the same greedy tokens as plain decoding, and most of
    its forwards were padded ones."""
    target = make_model(seed=0).to(device)
    drafter = make_drafter(target, "dspark").to(device)
    drafter.token_ranking = torch.randperm(97, generator=torch.Generator().manual_seed(2))
    cost = StepCostTable((1, 8, 64), (100.0, 90.0, 40.0))
    eng = Engine(target, drafter, EngineConfig(
        block_size=4, num_blocks=400, max_num_seqs=8, budget="algorithm1",
        draft_gating=False, draft_vocab=40, cuda_graphs=device == "cuda"),
        cost, StepCostTable((1, 8), (400.0, 300.0)))
    if device == "cpu":
        enable_graphs(eng, capture=False)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 97, (3 + 5 * i,), generator=gen).tolist() for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=20)
    got = eng.generate(prompts, params, (7,))
    assert got == [list(generate_tokens(target, p, params, (7,))) for p in prompts]
    assert eng.runner.graphs.replays > eng.runner.num_forwards / 2
    assert eng.draft_worker.graphs.replays > 0


@GPU
def test_captured_graph_replays_the_eager_forward(make_model, verify_batch):
    model = make_model(seed=3).cuda()
    seqs = [list(range(5, 5 + n)) for n in (12, 20, 7)]
    blocks = BlockManager(NUM_BLOCKS, BLOCK)
    for i, s in enumerate(seqs):
        blocks.allocate(str(i), s)
    eager, padded = two_runners(model, "cuda", capture=True)
    prefill(verify_batch, (eager, padded), blocks, seqs, [n - 3 for n in (12, 20, 7)])
    for spans in ([(9, 10), (17, 18), (4, 5)], [(9, 12), (17, 19), (4, 7)]):
        batch = verify_batch(blocks, seqs, spans, True, "cuda")
        assert_same(padded.forward(batch), eager.forward(batch))
    assert len(padded.graphs.graphs) == 2 and all(
        graph is not None for graph, _ in padded.graphs.graphs.values())
    # a replay with other requests' tables and tokens in the same bucket
    batch = verify_batch(blocks, seqs, [(10, 11), (18, 19), (5, 6)], True, "cuda")
    assert_same(padded.forward(batch), eager.forward(batch))
    assert len(padded.graphs.graphs) == 2
