#!/usr/bin/env bash
# The GPU checks of the engine, in one run (see ../shared/docs/GPU.md): no install, no Ray.
#   kernels  kernel tests compiled by Triton for the GPU (TRITON_INTERPRET=0);
#   sps      a randomly initialised MoE target of 5.1 B parameters: SPS(B) with its experts
#            run sparse and grouped, the drafting cost of 1- and 3-layer DSpark drafters on
#            it, a forward eager vs replayed from a CUDA graph (bench/large_target.py);
#   ep       the expert-parallel MoE layer over NCCL (one-rank group) vs the unsharded layer;
#   compile  one drafter call eager and compiled (torch.compile, and CUDA graphs through its
#            reduce-overhead mode), side by side (bench/compile_probe.py);
#   engine   `dspark bench engine` on the demo checkpoints on the GPU;
#   graphs   CUDA graphs in the engine (EngineConfig.cuda_graphs): the padded forwards'
#            tests, the captured graph's among them, then `dspark bench engine` with no
#            speculation and the serving default each with and without graphs;
#   syncs    where an engine step makes the host wait for the GPU: the host-to-device
#            helpers' test, then every sync of no speculation's and the serving default's
#            steps counted and placed by torch's sync debug mode (bench/host_syncs.py),
#            then their stages timed to the end of their kernels (bench engine --phase-sync).
# A device call runs at most 10 minutes: all default steps may not fit in one; run
# ONLY=graphs,syncs first (about 7 minutes expected; its steps' limits add up to 11 and a
# device call stops at 10), then ONLY=sps,kernels,engine with the time left.
# Usage: [ONLY=sps,ep] [OUT=dir] [CONC=.. ROUNDS=.. SYSTEMS=..] bash bench/gpu_check.sh [cpu]
# ("cpu" runs a tiny version of the same steps here, to check the script; ONLY runs the steps
# named, by default kernels,graphs,syncs,sps,engine; CONC, ROUNDS and SYSTEMS set the engine
# benchmark's). Results go to $OUT (default
# runs/gpu-check). Each step runs under its own time limit and a failed step stops no other;
# the steps' exit codes and seconds go to $OUT/summary.txt, all output to $OUT/log.txt, the
# engine benchmark's files to $OUT/engine.tgz (the device tool brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
DEVICE=${1:-cuda}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
exec > >(tee -a "$OUT/log.txt") 2>&1
ONLY=${ONLY:-kernels,graphs,syncs,sps,engine}  # ep and compile: measured in session 29
step() {  # step NAME[:PART] SECONDS COMMAND...: run one check under a time limit, record rc
    # and time (ONLY names the step, every part of it)
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    [[ ",$ONLY," == *",${name%%:*},"* ]] || return 0
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt"
}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "$DEVICE" = cpu ] && PY=.venv/bin/python
# the package layout without installing: dspark.<folder> -> <folder>
PKG=$(mktemp -d)
mkdir -p "$PKG/dspark"
for d in models workers kernels bench training cluster router; do
    [ -d "$d" ] && ln -s "$PWD/$d" "$PKG/dspark/$d"
done
export PYTHONPATH="$PKG" RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), file=sys.stderr)"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv

if [ "$DEVICE" = cuda ]; then
    step kernels 90 env TRITON_INTERPRET=0 "$PY" -P -m pytest -q \
        -p no:cacheprovider --import-mode=importlib --rootdir="$PWD" tests/kernels
    SIZES="1,2,4,8,16,32,64,128,256,512,1024"; CONC=${CONC:-1,4,32}; TOKENS=64; LONG=${LONG:-180}
    SYNC_CONC=1,32; SYNC_TOKENS=32
else
    SIZES="1,4,16"; CONC=${CONC:-1,2}; TOKENS=8; LONG=120; SYNC_CONC=1,2; SYNC_TOKENS=8
fi

step graphs:tests 180 env TRITON_INTERPRET=0 "$PY" -P -m pytest -q -p no:cacheprovider \
    --import-mode=importlib --rootdir="$PWD" tests/workers/test_graphs.py
if [ "$DEVICE" = cuda ]; then
    step graphs:engine 240 \
        "$PY" -P -m dspark.cluster.cli bench engine --device cuda --concurrency "$CONC" \
        --max-tokens "$TOKENS" --min-requests 16 --rounds "${ROUNDS:-1}" \
        --systems no-spec,no-spec-graphs,dspark-d2-alg1,dspark-d2-alg1-graphs --out "$OUT/graphs"
    [ -d "$OUT/graphs" ] && tar -czf "$OUT/graphs.tgz" -C "$OUT" graphs && rm -rf "$OUT/graphs"
fi

step syncs:tests 60 env TRITON_INTERPRET=0 "$PY" -P -m pytest -q -p no:cacheprovider \
    --import-mode=importlib --rootdir="$PWD" tests/workers/test_host_syncs.py
step syncs:count 90 "$PY" -P -m dspark.bench.host_syncs --device "$DEVICE" \
    --concurrency "$SYNC_CONC" --max-tokens "$SYNC_TOKENS" --out "$OUT/host-syncs.json"
# each stage of a step timed to the end of its kernels (EngineConfig.phase_sync): the
# host's share of a step without the waits that the stages reading values back absorb
step syncs:phases 90 "$PY" -P -m dspark.cluster.cli bench engine --device "$DEVICE" \
    --phase-sync --concurrency "$SYNC_CONC" --max-tokens "$SYNC_TOKENS" --min-requests 16 \
    --rounds 1 --systems no-spec,dspark-d2-alg1 --out "$OUT/phases"
[ -d "$OUT/phases" ] && tar -czf "$OUT/phases.tgz" -C "$OUT" phases && rm -rf "$OUT/phases"

step sps 240 "$PY" -P -m dspark.bench.large_target --device "$DEVICE" --sizes "$SIZES" \
    --out "$OUT/large-target.json"

step ep 40 "$PY" -P - "$DEVICE" "$OUT/ep-layer.json" <<'PY'
import json, socket, sys, torch
import torch.distributed as dist
from dspark.models.config import TargetConfig
from dspark.models.target import TargetModel
from dspark.workers.expert_parallel import ExpertParallelMoE
device, out = sys.argv[1], sys.argv[2]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
backend = "nccl" if device == "cuda" else "gloo"
dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
cfg = TargetConfig(vocab_size=512, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, intermediate_size=512, num_experts=16,
                   num_experts_per_tok=4, moe_intermediate_size=128, max_position_embeddings=64)
model = TargetModel(cfg); model.init_weights(0)
model = model.to(device).eval()
block = model.model.layers[0].mlp
x = torch.randn(300, 256, device=device)
with torch.no_grad():
    ref = block(x)
    got = ExpertParallelMoE(block, dist.group.WORLD, 0, 1)(x)
err = float((got - ref).abs().max())
print(json.dumps({"backend": backend, "max_abs_err": err}))
json.dump({"backend": backend, "max_abs_err": err, "tokens": 300}, open(out, "w"))
dist.destroy_process_group()
assert err < 1e-4, err
PY

if [ "$DEVICE" = cuda ]; then
    step compile 110 \
        "$PY" -P -m dspark.bench.compile_probe --device cuda --requests 1,64 \
        --modes eager,default,reduce-overhead
else
    step compile 120 "$PY" -P -m dspark.bench.compile_probe --requests 1 \
        --repeats 3 --modes eager
fi

# the serving default (DSpark with MTP-1 beside it), DSpark alone, MTP-1 and no
# speculation; one round, both T
step engine "$LONG" \
    "$PY" -P -m dspark.cluster.cli bench engine --device "$DEVICE" --concurrency "$CONC" \
    --max-tokens "$TOKENS" --min-requests 16 --rounds "${ROUNDS:-1}" \
    --systems "${SYSTEMS:-no-spec,mtp-1,dspark-d2-mtp,dspark-d2-alg1}" --out "$OUT/engine"
[ -d "$OUT/engine" ] && tar -czf "$OUT/engine.tgz" -C "$OUT" engine && rm -rf "$OUT/engine"
rm -rf "$PKG"
