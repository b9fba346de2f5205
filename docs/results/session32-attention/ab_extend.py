"""In one process, alternating: an MTP-1 drafter writing its pairs (``DraftWorker.extend``)
as committed (every pair writes K/V, only each request's last pair queries and runs the
MLP: ``LastPairsAttention``) and as before session 32 (every pair through the whole layer,
``PagedAttention``), the median of 25 calls each; the last hiddens of both are compared.

Run from the repository root: ``python -P docs/results/session32-attention/ab_extend.py``
"""

from __future__ import annotations

import time

import torch

from dspark.models.drafter_checkpoint import load_drafter
from dspark.models.generation import load_for_generation
from dspark.workers.drafting import DraftWorker, ExtendBatch
from dspark.workers.model_runner import PagedAttention

REPEATS = 25


def extend_whole_layer(worker: DraftWorker, batch: ExtendBatch) -> torch.Tensor:
    """The extend of 9482ee3: every pair through the layer, the last ones' outputs read."""
    d = worker.drafter
    seq_lens = batch.positions[batch.cu[1:] - 1] + 1
    attention = PagedAttention(worker.kv, batch.block_tables, batch.cu, batch.positions,
                               seq_lens, batch.q_lens)
    h0 = d.fc(batch.features[None].float())
    h = d.step(h0, batch.next_ids[None], batch.positions[None], attention)
    return h[0, batch.cu[1:] - 1]


def main() -> None:
    torch.set_num_threads(2)
    target, _ = load_for_generation("checkpoints/target")
    target.eval()
    worker = DraftWorker(load_drafter("checkpoints/drafters/mtp", target), 2048, 16)
    cfg = worker.config
    print("MTP-1 extend: requests x pairs each, after 200 positions of context")
    for num_req, each in [(1, 2), (1, 6), (8, 2), (16, 2), (32, 2), (64, 2), (64, 3)]:
        per_req = -(-(200 + each) // 16)
        tables = torch.arange(num_req * per_req).view(num_req, per_req)
        positions = torch.cat([torch.arange(200, 200 + each)] * num_req)
        batch = ExtendBatch(
            req_ids=[f"ab-{i}" for i in range(num_req)],
            features=torch.randn(num_req * each, cfg.feature_dim),
            next_ids=torch.randint(5, cfg.vocab_size, (num_req * each,)),
            positions=positions, cu=torch.arange(num_req + 1) * each,
            block_tables=tables, q_lens=[each] * num_req)
        times: dict[str, list[float]] = {"whole": [], "last": []}
        with torch.inference_mode():
            for _ in range(REPEATS):
                start = time.perf_counter()
                want = extend_whole_layer(worker, batch)
                times["whole"].append(time.perf_counter() - start)
                start = time.perf_counter()
                worker.extend(batch)
                times["last"].append(time.perf_counter() - start)
        got = torch.stack([worker.last_h[r] for r in batch.req_ids])
        diff = (got - want).abs().max().item()
        whole, last = (sorted(t)[len(t) // 2] * 1e3 for t in (times["whole"], times["last"]))
        print(f"  {num_req:3d} x {each}: whole layer {whole:5.2f} ms  last pairs {last:5.2f} ms"
              f"  ratio {last / whole:.3f}  (largest difference of the hiddens {diff:.1e})")
        for r in batch.req_ids:
            worker.forget(r)


if __name__ == "__main__":
    main()
