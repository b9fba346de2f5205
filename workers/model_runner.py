"""The model runner: the target's one forward over a flattened, variable-length batch with
paged KV (the paged attention backend), and the profiled step-cost table SPS(B). It makes
no policy decisions.

Vocabulary:
- *verify batch*: every scheduled request's fed tokens, contiguous (a prefill chunk, or the
  anchor plus the ℓ_r drafts kept by the verification budget), with a per-token position;
- *logit rows*: the rows whose next-token distribution is needed (all rows of a decoding
  request, the last row of a prefill chunk that completes its prompt);
- *features*: what a parallel drafter or EAGLE-3 reads per row (raw residuals of its
  feature layers); MTP-1 reads the final normed *hidden* of each row instead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dspark.kernels.paged_attention import PagedLayout, paged_attention, split_layout
from dspark.kernels.transfer import device_tensor
from dspark.models.target import TargetModel
from dspark.workers.allocator import keep_freed_memory
from dspark.workers.budget import StepCostTable, VerificationPlan
from dspark.workers.expert_parallel import timed_layers
from dspark.workers.graphs import GraphedForward
from dspark.workers.step import DraftProposal, SeqRows, StepSeq


@dataclass
class VerifyBatch:
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    cu_q: torch.Tensor  # [R + 1]
    block_tables: torch.Tensor  # [R, max_blocks]
    seq_lens: torch.Tensor  # [R] tokens with KV after this forward
    logit_rows: torch.Tensor  # [M] row indices into N
    q_lens: list[int]  # [R] rows of each request, on the host
    key_lens: list[int]  # [R] seq_lens on the host
    all_logits: bool = False
    """Every row is a logit row, in order (decoding and verifying requests only): the
    batch may run padded to a bucket (``GraphedForward``)."""

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


@dataclass
class RunnerOutput:
    logits: torch.Tensor  # [M, V]
    features: torch.Tensor | None  # [N, F] the feature layers' residuals, or None
    hidden: torch.Tensor  # [N, d] the final normed hidden of each fed row (MTP-1's input)
    slots: torch.Tensor  # [N] the KV slot of each fed row


class PagedKV:
    """Paged key/value storage of several layers: ``[layers, num_slots, kv_heads, head_dim]``."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots: [N]; k, v: [N, kv_heads, head_dim]
        self.k[layer, slots] = k.to(self.k.dtype)
        self.v[layer, slots] = v.to(self.v.dtype)

    def write_layers(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Every layer at once: slots [N]; k, v [layers, N, kv_heads, head_dim]."""
        self.k[:, slots] = k.to(self.k.dtype)
        self.v[:, slots] = v.to(self.v.dtype)


def token_slots(batch_tables: torch.Tensor, req_of: torch.Tensor, positions: torch.Tensor,
                block_size: int) -> torch.Tensor:
    """Slot of every row: [N]."""
    return batch_tables[req_of, positions // block_size] * block_size + positions % block_size


class PagedAttention:
    """The paged attention backend of a flattened, variable-length batch.

    The models see the batch as one row (B = 1, T = N tokens); each layer writes its new
    keys/values to the rows' slots, then every query attends to its own request's keys at
    positions <= its own through the paged kernel (so verify is causal among the drafts).
    """

    def __init__(
        self,
        kv: PagedKV,
        block_tables: torch.Tensor,  # [R, max_blocks]
        cu_q: torch.Tensor,  # [R + 1] row offsets of each request
        positions: torch.Tensor,  # [N] absolute position of each row
        seq_lens: torch.Tensor,  # [R] keys of each request after this forward
        q_lens: list[int],  # [R] rows of each request (host)
        key_lens: list[int] | None = None,  # seq_lens on the host
    ) -> None:
        # NOTE: a host read-back only where the caller did not bring the key lengths (the
        # drafter's extend); the verify batch brings them
        key_lens = key_lens if key_lens is not None else seq_lens.tolist()
        self.layout = split_layout(block_tables, kv.block_size, seq_lens, positions, q_lens,
                                   key_lens)  # NOTE: grouped by query length where it pays
        req_of = self.layout.req_of if isinstance(self.layout, PagedLayout) else (
            torch.repeat_interleave(torch.arange(len(q_lens), device=positions.device),
                                    cu_q[1:] - cu_q[:-1], output_size=sum(q_lens)))
        self.slots = token_slots(block_tables, req_of, positions,
                                 kv.block_size)  # [N] where this forward's K/V go
        self.kv = kv

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q: [1, H, N, hd]; k, v: [1, kv_heads, N, hd] -> [1, H, N, hd]
        self.kv.write(layer_idx, self.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        out = paged_attention(
            q[0].transpose(0, 1), self.kv.k[layer_idx], self.kv.v[layer_idx], self.layout
        )  # [N, H, hd]
        return out.transpose(0, 1)[None]


class LastPairsAttention(PagedAttention):
    """``PagedAttention`` for a layer run whose output is wanted at each request's last row
    only (an autoregressive drafter writing its pairs, ``DraftWorker.extend``): every row
    writes its keys and values, and only the last row of each request queries (the queries
    ``attend`` is given are those rows', in request order)."""

    def __init__(self, kv: PagedKV, block_tables: torch.Tensor, cu_q: torch.Tensor,
                 positions: torch.Tensor, seq_lens: torch.Tensor, q_lens: list[int]) -> None:
        num_req = len(q_lens)
        last = cu_q[1:] - 1  # [R]
        super().__init__(kv, block_tables, torch.arange(num_req + 1, device=cu_q.device),
                         positions.index_select(0, last), seq_lens, [1] * num_req)
        req_of = torch.repeat_interleave(torch.arange(num_req, device=cu_q.device),
                                         cu_q[1:] - cu_q[:-1], output_size=sum(q_lens))
        self.slots = token_slots(block_tables, req_of, positions, kv.block_size)  # [N]
        self.last = last


class ModelRunner:
    """Prepares the paged backend of each verify batch and runs the target's one forward."""

    def __init__(
        self,
        target: TargetModel,
        num_blocks: int,
        block_size: int,
        feature_layers: Sequence[int] = (),
    ) -> None:
        # NOTE: process-wide: each forward's temporaries reuse the pages of the one before
        keep_freed_memory()
        cfg = target.config
        self.target, self.block_size = target, block_size
        self.feature_layers = tuple(feature_layers)
        self.num_forwards = 0
        param = target.lm_head.weight
        self.device = param.device
        # NOTE: one block past ``num_blocks``, which the block manager never hands out:
        # where padded rows write (``GraphedForward``)
        self.kv = PagedKV(
            cfg.num_hidden_layers, num_blocks + 1, block_size, cfg.num_key_value_heads,
            cfg.head_dim, param.dtype, param.device,
        )
        self.scratch_block = num_blocks
        self.graphs: GraphedForward | None = None
        """Qualifying batches padded to buckets (``enable_graphs``); None: all eager."""

    def enable_graphs(self, max_requests: int, capture: bool) -> None:
        """Run decode and verify batches of up to ``max_requests`` requests padded to
        buckets: replayed from CUDA graphs (``capture``, a CUDA device) or eagerly."""
        if capture and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the target on a CUDA device, got "
                             f"{self.device.type}")
        self.graphs = GraphedForward(self, max_requests, capture)

    def verify(self, seqs: list[StepSeq], proposal: DraftProposal | None,
               plan: VerificationPlan | None, tables: torch.Tensor
               ) -> tuple[RunnerOutput, list[SeqRows], int]:
        """Lay the step out (each request's fed tokens, kept drafts included, contiguous;
        the logit rows tokens are drawn from or prompts scored at) and run the target:
        (logits and features, each request's rows, rows of the forward)."""
        rows = self._rows(seqs, proposal, plan)
        batch = self._batch(rows, tables)
        return self.forward(batch), rows, batch.num_tokens

    @staticmethod
    def _rows(seqs, proposal, plan) -> list[SeqRows]:
        drafted = {}
        if proposal is not None:
            tokens = proposal.tokens.tolist()
            drafted = {s.row: tokens[i][:n]
                       for i, (s, n) in enumerate(zip(proposal.seqs, plan.lengths))}
        return [SeqRows(s, s.known + drafted.get(s.row, []), drafted.get(s.row, []))
                for s in seqs]

    @staticmethod
    def _batch(layout: list[SeqRows], tables: torch.Tensor) -> VerifyBatch:
        ids, positions, cu, seq_lens, logit_rows = [], [], [0], [], []
        all_logits = True
        for lay in layout:
            s, row0 = lay.seq, len(ids)
            ids += lay.fed
            positions += range(s.start, s.start + len(lay.fed))
            cu.append(len(ids))
            seq_lens.append(s.start + len(lay.fed))
            lay.logit_start = len(logit_rows)
            if s.scores:
                # NOTE: every row of the chunk scores the prompt token after it; the last
                # row of the final chunk is also the one the first token is drawn from
                lay.num_scored = len(lay.fed) - (1 if s.samples else 0)
                logit_rows += range(row0, len(ids))
            elif s.samples:
                first = row0 + len(lay.fed) - 1 if s.prefill else row0
                logit_rows += range(first, len(ids))
            all_logits = all_logits and not s.prefill and s.samples
        # NOTE: one host-to-device copy of the five index lists, then views of it
        packed = device_tensor(ids + positions + cu + seq_lens + logit_rows, tables.device,
                               torch.long)
        ids_t, pos_t, cu_t, lens_t, rows_t = packed.split(
            [len(ids), len(positions), len(cu), len(seq_lens), len(logit_rows)])
        return VerifyBatch(
            input_ids=ids_t,
            positions=pos_t,
            cu_q=cu_t,
            block_tables=tables,
            seq_lens=lens_t,
            logit_rows=rows_t,
            q_lens=[len(lay.fed) for lay in layout],
            key_lens=seq_lens,
            all_logits=all_logits,
        )

    @torch.no_grad()
    def forward(self, batch: VerifyBatch) -> RunnerOutput:
        self.num_forwards += 1
        padded = self.graphs.forward(batch) if self.graphs is not None else None
        if padded is not None:
            logits, hidden, features, slots = padded
            return RunnerOutput(logits=logits, features=features, hidden=hidden, slots=slots)
        attention = PagedAttention(self.kv, batch.block_tables, batch.cu_q, batch.positions,
                                   batch.seq_lens, batch.q_lens, batch.key_lens)
        layers = self.feature_layers
        out = self.target(
            batch.input_ids[None], positions=batch.positions[None], feature_layers=layers,
            attention=attention, logit_rows=batch.logit_rows,
        )
        features = out.layer_features[0] if layers else None  # [N, len(layers) * d]
        return RunnerOutput(logits=out.logits[0], features=features,
                            hidden=out.hidden_states[0], slots=attention.slots)


def dummy_batch(
    num_tokens: int, num_req: int, context: int, block_size: int, vocab: int, device
) -> VerifyBatch:
    """``num_tokens`` fed tokens split over ``num_req`` requests that each already hold
    ``context`` tokens of KV, laid out in consecutive blocks (for profiling only)."""
    sizes = [num_tokens // num_req + (1 if r < num_tokens % num_req else 0) for r in range(num_req)]
    blocks_per = -(-(context + max(sizes)) // block_size)
    tables = torch.arange(num_req * blocks_per, device=device).view(num_req, blocks_per)
    positions = torch.cat([torch.arange(context, context + n, device=device) for n in sizes])
    cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], device=device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (num_tokens,), generator=gen).to(device)
    return VerifyBatch(
        input_ids=ids,
        positions=positions,
        cu_q=cu,
        block_tables=tables,
        seq_lens=torch.tensor([context + n for n in sizes], device=device),
        logit_rows=torch.arange(num_tokens, device=device),
        q_lens=sizes,
        key_lens=[context + n for n in sizes],
        all_logits=True,
    )


def profile_step_costs(
    runner: ModelRunner,
    batch_sizes: Sequence[int],
    max_requests: int,
    context: int,
    num_blocks: int,
    repeats: int = 3,
) -> StepCostTable:
    """SPS(B): verify forwards per second at each verify batch size B, and with expert
    parallelism the share of each forward spent in the MoE layers' experts on the rows the
    group sent them (the part of a step that follows the group's tokens).

    Each size is timed ``repeats`` times in passes over all sizes, and its fastest forward
    kept (with its share): a burst of other work on the machine (a replica starting beside
    it) slows a few forwards, and timing one size's repeats back to back (the median of
    three, until session 15) let one burst lift that size alone. The online table keeps
    the profile's shape (``OnlineCostTable``), so a size lifted here would stay dear
    relative to the others.

    Must run before any request holds KV: the dummy requests overwrite blocks from 0 on.
    """
    vocab = runner.target.config.vocab_size
    moe = timed_layers(runner.target, True)
    try:
        batches = []
        for num_tokens in sorted(set(batch_sizes)):
            batch = _profile_batch(runner, num_tokens, max_requests, context, num_blocks,
                                   vocab)
            if batch is None:
                break  # not enough KV to lay this batch out
            runner.forward(batch)  # warm-up
            batches.append((num_tokens, batch))
        best: dict[int, tuple[float, float]] = {}
        for _ in range(repeats):
            for num_tokens, batch in batches:
                timed = _time_forward(runner, batch, moe)
                if num_tokens not in best or timed[0] < best[num_tokens][0]:
                    best[num_tokens] = timed
    finally:
        timed_layers(runner.target, False)
    sizes = [n for n, _ in batches]
    return StepCostTable(tuple(sizes), tuple(1.0 / best[n][0] for n in sizes),
                         tuple(best[n][1] for n in sizes) if moe else ())


def _profile_batch(runner, num_tokens, max_requests, context, num_blocks, vocab
                   ) -> VerifyBatch | None:
    """The dummy verify batch of ``num_tokens`` (None: the cache cannot hold it)."""
    num_req = max(1, min(max_requests, num_tokens))
    sizes_per = -(-num_tokens // num_req)
    if num_req * -(-(context + sizes_per) // runner.block_size) > num_blocks:
        return None
    return dummy_batch(num_tokens, num_req, context, runner.block_size, vocab, runner.device)


def _time_forward(runner, batch, moe) -> tuple[float, float]:
    """(seconds of one forward, the MoE layers' share of it)."""
    before = sum(layer.seconds for layer in moe)
    start = time.perf_counter()
    runner.forward(batch)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    share = (sum(layer.seconds for layer in moe) - before) / elapsed
    return elapsed, min(1.0, max(0.0, share))
