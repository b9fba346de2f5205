"""`python -m dspark.bench.large_target`: what a step costs on a target of realistic size.

A randomly initialised MoE target (on a GPU: 16 layers, width 2048, 64 experts of which 8
per token, a 32k vocabulary, 5.1 B parameters in bf16; on the CPU a tiny one, to check this
script) is built and drawn on the device. Measured side by side in one process:

1. SPS(B), verify forwards per second over the paged KV cache against the tokens B in the
   batch (``profile_step_costs``, as the engine profiles at start-up), with the routed
   experts run each way (``SparseMoeBlock.expert_path``: ``sparse``, one chain of kernels
   per active expert behind a host sync; ``grouped``, two grouped products; ``dense`` on the
   CPU only);
2. the drafting call of random DSpark drafters of 1 and 3 layers on this target against the
   requests drafted for, and against a plain step of as many tokens (the default path);
3. on CUDA, one forward of B single tokens (no KV cache) eager against its replay from a
   captured CUDA graph: what kernel launches cost a step of this target;
4. 1 and 2 again through the engine's CUDA graphs (``EngineConfig.cuda_graphs``: the verify
   forwards and the drafting calls padded to buckets and replayed; eager on the CPU).

Random weights: the costs are real, the drafts are not (acceptance needs trained models).
With ``--target DIR`` a checkpoint (the demo target) is profiled instead, every expert path
and ``auto`` (the engine's choice), step 1 only. Results as JSON to ``--out`` and printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_target(device: str):
    from dspark.models.config import TargetConfig
    from dspark.models.target import TargetModel

    big = device != "cpu"
    cfg = TargetConfig(
        vocab_size=32000 if big else 512, hidden_size=2048 if big else 64,
        num_hidden_layers=16 if big else 2, num_attention_heads=16 if big else 4,
        num_key_value_heads=4 if big else 2, head_dim=128 if big else 16,
        intermediate_size=5632 if big else 128, num_experts=64 if big else 4,
        num_experts_per_tok=8 if big else 2, moe_intermediate_size=768 if big else 32,
        max_position_embeddings=4096 if big else 256,
    )
    with torch.device(device):  # built and drawn where it runs: billions of weights
        model = TargetModel(cfg)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype=torch.bfloat16 if big else torch.float32).eval()


def set_expert_path(model, path: str) -> None:
    for layer in model.model.layers:
        layer.mlp.expert_path = path


def step_costs(model, sizes, paths, blocks: int, context: int, graphs: bool = False) -> dict:
    """SPS(B) per expert path: {path: [{B, steps_per_s, ms}]} and the tables themselves;
    ``graphs``: the engine's padded forwards (``ModelRunner.enable_graphs``), captured in
    CUDA graphs on a GPU (eager on the CPU, to check this script)."""
    from dspark.workers.model_runner import ModelRunner, profile_step_costs

    rows, tables = {}, {}
    for path in paths:
        set_expert_path(model, path)
        runner = ModelRunner(model, blocks, 16)
        if graphs:
            runner.enable_graphs(64, capture=model.lm_head.weight.is_cuda)
        table = profile_step_costs(runner, sizes, max_requests=64, context=context,
                                   num_blocks=blocks, repeats=5)
        tables[path] = table
        rows[path] = [{"B": b, "steps_per_s": s, "ms": 1000 / s}
                      for b, s in zip(table.batch_sizes, table.steps_per_second)]
        del runner
    set_expert_path(model, "auto")
    return {"rows": rows, "tables": tables}


def drafting_costs(model, table, blocks: int, context: int, max_requests: int,
                   graphs: bool = False) -> dict:
    """Per drafter depth: drafting ms against the requests drafted for, and that against a
    plain step of as many tokens (``table``); ``graphs``: the calls padded to buckets
    (``DraftWorker.enable_graphs``), captured on a GPU."""
    from dspark.models.draft_layers import init_trainable
    from dspark.models.drafter_checkpoint import build_drafter
    from dspark.models.drafter_config import DrafterConfig
    from dspark.workers.draft_profile import profile_draft_costs
    from dspark.workers.drafting import DraftWorker

    param = model.lm_head.weight
    out = {}
    for depth in (1, 3):
        dcfg = DrafterConfig.for_target(model.config, "dspark", mask_token_id=4,
                                        num_layers=depth)
        drafter = build_drafter(dcfg, model)
        init_trainable(drafter, depth)
        drafter = drafter.to(device=param.device, dtype=param.dtype).eval()
        worker = DraftWorker(drafter, blocks, 16)
        if graphs:
            worker.enable_graphs(max_requests, capture=param.is_cuda)
        reqs = [r for r in (1, 2, 4, 8, 16, 32, 64) if r <= max_requests]
        dtable = profile_draft_costs(worker, reqs, context, dcfg.block_size, blocks)
        out[depth] = [{"requests": r, "ms": 1000 / s, "ms_per_request": 1000 / s / r,
                       "vs_plain_step": (1000 / s) / (1000 / table.sps(r))}
                      for r, s in zip(dtable.batch_sizes, dtable.steps_per_second)]
    return out


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def graph_probe(model, batches) -> list[dict]:
    """One forward of B single tokens, eager vs replayed from a CUDA graph (grouped path)."""
    rows = []
    vocab = model.config.vocab_size
    for num in batches:
        ids = torch.randint(5, vocab, (num, 1), device="cuda")
        with torch.no_grad():
            eager = model(ids).logits
            eager_ms = _median_ms(lambda ids=ids: model(ids), 20)
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
                    for _ in range(2):
                        model(ids)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured = model(ids).logits
                graph.replay()
                err = float((captured.float() - eager.float()).abs().max())
                graph_ms = _median_ms(graph.replay, 20)
                rows.append({"B": num, "eager_ms": eager_ms, "graph_ms": graph_ms,
                             "eager_over_graph": eager_ms / graph_ms, "max_abs_diff": err})
            except Exception as exc:  # noqa: BLE001 - the probe reports what failed
                rows.append({"B": num, "eager_ms": eager_ms, "error": repr(exc)[:300]})
    return rows


def checkpoint_costs(args, sizes) -> int:
    """SPS(B) of a checkpoint's target with each expert path and the engine's own choice."""
    from dspark.models.generation import load_for_generation

    model, _ = load_for_generation(args.target)
    model = model.to(args.device).eval()
    paths = ("sparse", "dense", "grouped", "auto")
    costs = step_costs(model, sizes, paths, 2048, 128)
    result = {"device": args.device, "target": args.target, "threads": args.threads,
              "sps": costs["rows"]}
    print(f"{'B':>5}" + "".join(f"{p:>10}" for p in paths) + "   ms per forward")
    for i, row in enumerate(costs["rows"]["sparse"]):
        print(f"{row['B']:>5}" + "".join(f"{costs['rows'][p][i]['ms']:>10.2f}" for p in paths))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (cpu: a tiny target)")
    parser.add_argument("--sizes", default="1,4,16", help="verify batch sizes B")
    parser.add_argument("--out", default="runs/large-target.json", help="JSON results")
    parser.add_argument("--target", default="", help="a checkpoint to profile instead")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    big = args.device != "cpu"
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.target:
        return checkpoint_costs(args, sizes)
    blocks, context = (4096, 512) if big else (256, 32)
    model = build_target(args.device)
    paths = ("sparse", "grouped") if big else ("sparse", "dense", "grouped")
    costs = step_costs(model, sizes, paths, blocks, context)
    result = {"device": args.device, "params_M": model.num_parameters() / 1e6,
              "dtype": str(model.lm_head.weight.dtype), "sps": costs["rows"]}
    print(json.dumps(result, indent=1), flush=True)
    default = costs["tables"]["grouped"]
    result["drafting_vs_grouped_step"] = drafting_costs(model, default, blocks, context,
                                                        64 if big else 4)
    print(json.dumps(result["drafting_vs_grouped_step"], indent=1), flush=True)
    # the engine's CUDA graphs (workers/graphs.py, draft_graphs.py): the same tables with
    # the verify forwards and the drafting calls padded and replayed
    graphed = step_costs(model, sizes, ("auto",), blocks, context, graphs=True)
    result["sps_graphs"] = graphed["rows"]["auto"]
    result["drafting_vs_graphed_step"] = drafting_costs(
        model, graphed["tables"]["auto"], blocks, context, 64 if big else 4, graphs=True)
    print(json.dumps({k: result[k] for k in ("sps_graphs", "drafting_vs_graphed_step")},
                     indent=1), flush=True)
    if args.device.startswith("cuda"):
        set_expert_path(model, "grouped")
        result["cuda_graph"] = graph_probe(model, (1, 8, 64))
        print(json.dumps(result["cuda_graph"], indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
