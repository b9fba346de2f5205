"""`python -m dspark.bench.compile_probe`: what ``torch.compile`` does to one drafter call.

The drafter's call (the parallel backbone over one block per request, with its context K/V
held as tensors, then the LM head over the block) is timed eager and compiled, side by side
in one process, at fixed shapes (R requests, a context of S positions). Printed per shape
and mode: the first call's seconds (the compile, for a compiled mode) and the median ms
per call after it, the modes called in turn; compiled outputs are checked against eager ones
before they are timed.

Modes: ``eager``; ``default`` (inductor); ``reduce-overhead`` (inductor with CUDA graphs:
CUDA only). The serving engine runs the drafter eager over its paged cache, whose context
width changes every step; this probe measures the prize a compiled region would bring,
not the engine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

MODES = ("eager", "default", "reduce-overhead")


def drafter_call(drafter, ctx_kvs, mask):
    """The function timed: backbone over the blocks, then the LM head."""
    from dspark.models.draft_layers import ContextAttention

    def call(block_ids: torch.Tensor, block_pos: torch.Tensor) -> torch.Tensor:
        h = drafter.run_blocks(block_ids, block_pos, ContextAttention(ctx_kvs, mask))
        return drafter.lm_head(h)

    return call


def inputs(drafter, requests: int, context: int, device):
    """Random target features for ``context`` positions per request, their context K/V,
    one block per request anchored right after them, and the block's visibility mask."""
    cfg = drafter.config
    gen = torch.Generator().manual_seed(requests * 1000 + context)
    feats = torch.randn(requests, context, cfg.feature_dim, generator=gen).to(device)
    positions = torch.arange(context, device=device).expand(requests, context)
    ctx_kvs = drafter.context_kv(feats, positions)
    anchors = torch.randint(5, cfg.vocab_size, (requests,), generator=gen).to(device)
    block_ids, block_pos = drafter.draft_blocks(anchors, torch.full((requests,), context,
                                                                    device=device))
    mask = torch.ones(requests, 1, cfg.block_size, context + cfg.block_size, dtype=torch.bool,
                      device=device)
    return ctx_kvs, mask, block_ids, block_pos


def _timed(fn, args, sync) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(*args)
    sync()
    return time.perf_counter() - start, out


@torch.no_grad()
def probe(drafter, requests: int, context: int, modes, repeats: int, device) -> list[dict]:
    """Each mode's first call (the compile), then ``repeats`` rounds in which every mode
    is called once in turn: a drift of the machine's speed falls on all modes alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ctx_kvs, mask, block_ids, block_pos = inputs(drafter, requests, context, device)
    eager = drafter_call(drafter, ctx_kvs, mask)
    reference = eager(block_ids, block_pos)
    fns, first, errors = {}, {}, {}
    for mode in modes:
        fns[mode] = eager if mode == "eager" else torch.compile(eager, mode=mode, dynamic=False)
        first[mode], out = _timed(fns[mode], (block_ids, block_pos), sync)
        errors[mode] = float((out.float() - reference.float()).abs().max())
        if errors[mode] > 1e-2 * max(1.0, float(reference.abs().max())):
            raise AssertionError(f"{mode}: output differs from eager by {errors[mode]:g}")
    times = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            times[mode].append(_timed(fns[mode], (block_ids, block_pos), sync)[0])
    return [{"requests": requests, "context": context, "mode": mode,
             "first_call_s": first[mode], "ms_per_call": 1000 * statistics.median(times[mode]),
             "max_abs_err": errors[mode]} for mode in modes]


def main(argv: list[str] | None = None) -> int:
    from dspark.models.drafter_checkpoint import load_drafter
    from dspark.models.generation import load_for_generation

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="checkpoints/target", help="target checkpoint")
    parser.add_argument("--drafter", default="checkpoints/drafters/dspark", help="drafter")
    parser.add_argument("--requests", default="1,16", help="R, comma-separated")
    parser.add_argument("--context", type=int, default=128, help="context positions S")
    parser.add_argument("--modes", default="eager,default",
                        help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per number")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--device", default="cpu", help="torch device")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in MODES]:
        parser.error(f"--modes: {bad} not in {list(MODES)}")
    device = torch.device(args.device)
    if "reduce-overhead" in modes and device.type != "cuda":
        parser.error("--modes: reduce-overhead (CUDA graphs) needs --device cuda")
    torch.set_num_threads(args.threads)
    target, _ = load_for_generation(args.target)
    drafter = load_drafter(Path(args.drafter), target).to(device).eval()
    print(f"drafter {args.drafter}, {args.device}, context {args.context}; "
          "first call s (the compile) and median ms per call")
    for requests in (int(r) for r in args.requests.split(",")):
        rows = probe(drafter, requests, args.context, modes, args.repeats, device)
        eager_ms = rows[0]["ms_per_call"] if rows[0]["mode"] == "eager" else None
        for row in rows:
            ratio = f"  x{row['ms_per_call'] / eager_ms:.2f} eager" if eager_ms else ""
            print(f"  R={requests:3d} {row['mode']:16s} first {row['first_call_s']:7.2f} s  "
                  f"{row['ms_per_call']:8.3f} ms{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
