#!/usr/bin/env bash
# The GPU checks of the engine, in one run (see ../shared/docs/GPU.md): no install, no Ray.
#   1. kernel tests compiled by Triton for the GPU (TRITON_INTERPRET=0);
#   2. the step-cost curve SPS(B) of a larger randomly initialised MoE target, and the
#      drafting cost per drafted request of 1- and 3-layer DSpark drafters on it;
#   3. the expert-parallel MoE layer over NCCL (one-rank group) against the unsharded layer;
#   4. one drafter call eager and compiled (torch.compile, and CUDA graphs through its
#      reduce-overhead mode), side by side (bench/compile_probe.py);
#   5. `dspark bench engine` on the demo checkpoints on the GPU.
# Results go to $OUT (default runs/gpu-check). Usage: bash bench/gpu_check.sh [cpu]
# ("cpu" runs a tiny version of the same steps here, to check the script itself).
# Each step runs under its own time limit and a failed step does not stop the others; the
# steps' exit codes and seconds go to $OUT/summary.txt, all output to $OUT/log.txt, and the
# engine benchmark's files to $OUT/engine.tgz (the device tool brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
DEVICE=${1:-cuda}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
exec > >(tee -a "$OUT/log.txt") 2>&1
step() {  # step NAME SECONDS COMMAND...: run one check under a time limit, record rc and time
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
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
    step "kernel tests, compiled by Triton" 90 env TRITON_INTERPRET=0 "$PY" -P -m pytest -q \
        -p no:cacheprovider --import-mode=importlib --rootdir="$PWD" tests/kernels
    SIZES="1,2,4,8,16,32,64,128,256,512,1024"; CONC="1,4,32"; TOKENS=64; LONG=180
else
    SIZES="1,4,16"; CONC="1,2"; TOKENS=8; LONG=120
fi

step "SPS(B) of a larger random MoE target; drafting cost per request" 130 \
    "$PY" -P - "$DEVICE" "$SIZES" "$OUT/sps-large.json" <<'PY'
import json, sys, torch
from dspark.models.config import TargetConfig
from dspark.models.target import TargetModel
from dspark.workers.model_runner import ModelRunner, profile_step_costs
device, sizes, out = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3]
big = device == "cuda"
cfg = TargetConfig(
    vocab_size=32000 if big else 512, hidden_size=2048 if big else 64,
    num_hidden_layers=16 if big else 2, num_attention_heads=16 if big else 4,
    num_key_value_heads=4 if big else 2, head_dim=128 if big else 16,
    intermediate_size=5632 if big else 128, num_experts=64 if big else 4,
    num_experts_per_tok=8 if big else 2, moe_intermediate_size=768 if big else 32,
    max_position_embeddings=4096 if big else 256,
)
dtype = torch.bfloat16 if big else torch.float32
with torch.device(device):  # built and drawn where it runs: billions of weights
    model = TargetModel(cfg)
gen = torch.Generator(device).manual_seed(0)
with torch.no_grad():
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)
model = model.to(dtype=dtype).eval()
blocks = 4096 if big else 256
runner = ModelRunner(model, blocks, 16)
table = profile_step_costs(runner, sizes, max_requests=64, context=512 if big else 32,
                           num_blocks=blocks, repeats=5)
rows = [{"B": b, "steps_per_s": s, "ms": 1000 / s} for b, s in
        zip(table.batch_sizes, table.steps_per_second)]
print(json.dumps({"params_M": model.num_parameters() / 1e6, "dtype": str(dtype), "rows": rows},
                 indent=1))
# drafting cost per drafted request: random DSpark drafters of 1 and 3 layers on this target
from dspark.models.drafter_config import DrafterConfig
from dspark.models.drafter_checkpoint import build_drafter
from dspark.models.draft_layers import init_trainable
from dspark.workers.drafting import DraftWorker
from dspark.workers.draft_profile import profile_draft_costs
drafters = {}
for depth in (1, 3):
    dcfg = DrafterConfig.for_target(cfg, "dspark", mask_token_id=4, num_layers=depth)
    drafter = build_drafter(dcfg, model)
    init_trainable(drafter, depth)
    drafter = drafter.to(device=device, dtype=dtype).eval()
    worker = DraftWorker(drafter, blocks, 16)
    reqs = [r for r in (1, 2, 4, 8, 16, 32, 64) if r <= (64 if big else 4)]
    dtable = profile_draft_costs(worker, reqs, 512 if big else 32, dcfg.block_size, blocks)
    drafters[depth] = [{"requests": r, "ms": 1000 / s, "ms_per_request": 1000 / s / r,
                        "vs_plain_step": (1000 / s) / (1000 / table.sps(r))}
                       for r, s in zip(dtable.batch_sizes, dtable.steps_per_second)]
    print(f"drafter {depth} layer(s):", json.dumps(drafters[depth], indent=1))
json.dump({"params_M": model.num_parameters() / 1e6, "dtype": str(dtype), "rows": rows,
           "drafting": drafters}, open(out, "w"), indent=1)
PY

step "expert-parallel MoE layer over torch.distributed (one rank) vs unsharded" 40 \
    "$PY" -P - "$DEVICE" "$OUT/ep-layer.json" <<'PY'
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
    step "a drafter call eager and compiled (torch.compile; CUDA graphs)" 110 \
        "$PY" -P -m dspark.bench.compile_probe --device cuda --requests 1,64 \
        --modes eager,default,reduce-overhead
else
    step "a drafter call eager" 120 "$PY" -P -m dspark.bench.compile_probe --requests 1 \
        --repeats 3 --modes eager
fi

# the serving default, its 3-layer sibling, MTP-1 and no speculation; one round, both T
step "engine benchmark on the demo checkpoints ($DEVICE)" "$LONG" \
    "$PY" -P -m dspark.cluster.cli bench engine --device "$DEVICE" --concurrency "$CONC" \
    --max-tokens "$TOKENS" --min-requests 16 --rounds 1 \
    --systems no-spec,mtp-1,dspark-d2-alg1,dspark-alg1 --out "$OUT/engine"
tar -czf "$OUT/engine.tgz" -C "$OUT" engine && rm -rf "$OUT/engine"
rm -rf "$PKG"
