#!/usr/bin/env bash
# Runs the four client tools people point at LLM servers against a running `dspark serve`,
# offline, with a local tokenizer folder, and prints one summary line per tool.
#
#   bash bench/clients/run.sh [BASE_URL] [TOKENIZER_DIR]
#   bash bench/clients/run.sh http://127.0.0.1:8000 checkpoints/target
#
# BASE_URL      server root, no /v1 (default http://127.0.0.1:8000)
# TOKENIZER_DIR a local Hugging Face tokenizer folder (default: checkpoints/target)
#
# Environment (all optional):
#   CLIENTS=.clients        where the venvs aiperf/ guidellm/ lm_eval/ schemathesis/ live
#                           (bench/clients/setup.sh makes them)
#   OUT=runs/clients        outputs (each tool's log, reports, out/summary.txt, out/commands.txt)
#   TOOLS="aiperf guidellm lm_eval schemathesis"   which tools to run
#   MODEL=dspark-demo  N=16 (aiperf/guidellm requests)  C=2 (concurrency)  ISL=64  OSL=48
#   LIMIT=5 (lm-eval docs per task)  LM_EVAL_BATCH=1 (prompts per /v1/completions request)
#   ST_MAX_EXAMPLES=20 (schemathesis examples per operation and phase)
#   LOG_REQUESTS=1     run each tool through proxy.py (a logging reverse proxy on a free
#                      loopback port) so out/requests/<run>.jsonl holds every request body and
#                      status; 0 points the tools at BASE_URL directly.
#
# Offline notes: every tool gets the local tokenizer folder; none needs HF_HUB_OFFLINE, and
# aiperf 0.13 must NOT have it (with it set, it treats a local folder as a hub repo id and fails
# "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"), so it is unset for aiperf.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
URL=${1:-http://127.0.0.1:8000}; URL=${URL%/}
TOK=${2:-$REPO/checkpoints/target}
TOK=$(cd "$TOK" 2>/dev/null && pwd) || { echo "tokenizer folder not found: ${2:-$TOK}" >&2; exit 2; }
CLIENTS=$(mkdir -p "${CLIENTS:-$REPO/.clients}" && cd "${CLIENTS:-$REPO/.clients}" && pwd)
OUT=$(mkdir -p "${OUT:-$REPO/runs/clients}" && cd "${OUT:-$REPO/runs/clients}" && pwd)
TASKS=${TASKS:-$HERE/lm_eval_tasks}
TOOLS=${TOOLS:-"aiperf guidellm lm_eval schemathesis"}
MODEL=${MODEL:-dspark-demo}
N=${N:-16}; C=${C:-2}; ISL=${ISL:-64}; OSL=${OSL:-48}
LIMIT=${LIMIT:-5}; LM_EVAL_BATCH=${LM_EVAL_BATCH:-1}; ST_MAX_EXAMPLES=${ST_MAX_EXAMPLES:-20}
LOG_REQUESTS=${LOG_REQUESTS:-1}
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false

for t in $TOOLS; do
  [[ -x $CLIENTS/$t/bin/python ]] || { echo "missing venv $CLIENTS/$t (run: bash bench/clients/setup.sh)" >&2; exit 2; }
done
curl -sf -m 10 "$URL/v1/models" >/dev/null || { echo "no server answering $URL/v1/models" >&2; exit 2; }

mkdir -p "$OUT/requests"
: > "$OUT/commands.txt"
: > "$OUT/summary.txt"
PROXY_PID=""
stop_proxy() { [[ -n "$PROXY_PID" ]] && kill "$PROXY_PID" 2>/dev/null; wait "$PROXY_PID" 2>/dev/null; PROXY_PID=""; }
trap stop_proxy EXIT

# target NAME: sets T (the URL the tool talks to) and, with LOG_REQUESTS=1, starts the proxy.
target() {
  stop_proxy
  rm -f "$OUT/requests/$1.jsonl"
  if [[ $LOG_REQUESTS == 1 ]]; then
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 "$HERE/proxy.py" --listen "$port" --upstream "$URL" --log "$OUT/requests/$1.jsonl" 2>/dev/null &
    PROXY_PID=$!
    for _ in $(seq 50); do
      python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
      sleep 0.1
    done
    T=http://127.0.0.1:$port
  else
    T=$URL
  fi
}

# run NAME TIMEOUT CMD...: runs the tool, logs to $OUT/NAME.log, records the command (with the
# server's own URL in place of the proxy's).
run() {
  local name=$1 limit=$2; shift 2
  local shown="$*"; shown=${shown//$T/$URL}
  printf '# %s\ncd %q && %s\n\n' "$name" "$PWD" "$shown" >> "$OUT/commands.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  stop_proxy
  echo "$rc $((SECONDS - t0))" > "$OUT/$name.rc"
  python3 "$HERE/summarize.py" "$OUT" "$name" | tee -a "$OUT/summary.txt"
}

for tool in $TOOLS; do
  case $tool in
  aiperf)
    for ep in chat completions; do
      rm -rf "$OUT/aiperf-$ep"
      target "aiperf-$ep"
      # chat: the server's token counts on every chunk (stream_options.continuous_usage_stats);
      # completions: aiperf's own count, re-tokenizing the returned text
      counts=()
      [[ $ep == chat ]] && counts=(--use-server-token-count --per-chunk-usage)
      run "aiperf-$ep" 900 env -u HF_HUB_OFFLINE "$CLIENTS/aiperf/bin/aiperf" profile "${counts[@]}" \
        --model "$MODEL" --url "$T" --endpoint-type "$ep" --streaming \
        --tokenizer "$TOK" \
        --synthetic-input-tokens-mean "$ISL" --synthetic-input-tokens-stddev 0 \
        --output-tokens-mean "$OSL" --output-tokens-stddev 0 --extra-inputs ignore_eos:true \
        --request-count "$N" --concurrency "$C" --random-seed 1 \
        --ui none --no-server-metrics --no-gpu-telemetry --workers-max 2 \
        --artifact-dir "$OUT/aiperf-$ep"
    done
    ;;
  guidellm)
    rm -rf "$OUT/guidellm"; mkdir -p "$OUT/guidellm"
    target guidellm
    run guidellm 900 "$CLIENTS/guidellm/bin/guidellm" run \
      --backend "kind=openai_http,target=$T,model=$MODEL" \
      --tokenizer "kind=huggingface_auto,model=$TOK" \
      --data "kind=synthetic_text,prompt_tokens=$ISL,output_tokens=$OSL" \
      --profile "kind=concurrent,streams=$C" \
      --constraint "kind=max_requests,count=$N" \
      --seed kind=static,value=1 \
      --output "kind=json,path=$OUT/guidellm/benchmarks.json" \
      --disable-progress
    ;;
  lm_eval)
    # The task YAMLs read data/ relative to the working directory: run from the task folder.
    rm -rf "$OUT/lm_eval-gen" "$OUT/lm_eval-loglik"
    target lm_eval-gen
    (cd "$TASKS" && run lm_eval-gen 900 "$CLIENTS/lm_eval/bin/lm-eval" run \
      --model local-chat-completions \
      --model_args "model=$MODEL,base_url=$T/v1/chat/completions,num_concurrent=$C,max_retries=1" \
      --apply_chat_template \
      --include_path . --tasks dspark_gsm8k_local --limit "$LIMIT" \
      --log_samples --output_path "$OUT/lm_eval-gen")
    target lm_eval-loglik
    (cd "$TASKS" && run lm_eval-loglik 900 "$CLIENTS/lm_eval/bin/lm-eval" run \
      --model local-completions \
      --model_args "model=$MODEL,base_url=$T/v1/completions,tokenizer=$TOK,tokenizer_backend=huggingface,tokenized_requests=True,max_length=512,num_concurrent=$C,max_retries=1" \
      --include_path . --tasks dspark_continuation_mc --limit "$LIMIT" --batch_size "$LM_EVAL_BATCH" \
      --log_samples --output_path "$OUT/lm_eval-loglik")
    ;;
  schemathesis)
    rm -rf "$OUT/schemathesis"
    target schemathesis
    (cd "$OUT" && run schemathesis 900 "$CLIENTS/schemathesis/bin/schemathesis" run "$T/openapi.json" \
      --checks all --max-examples "$ST_MAX_EXAMPLES" --workers 1 --seed 1 \
      --request-timeout 300 --max-response-time 300 --generation-database none --continue-on-failure --no-color \
      --report junit,ndjson --report-dir "$OUT/schemathesis")
    ;;
  *) echo "unknown tool $tool" >&2 ;;
  esac
done
if [[ $LOG_REQUESTS == 1 ]] && ls "$OUT"/requests/*.jsonl >/dev/null 2>&1; then
  python3 "$HERE/shapes.py" "$OUT"/requests/*.jsonl > "$OUT/request_shapes.txt"
fi
echo "outputs: $OUT (summary.txt, commands.txt, request_shapes.txt, <run>.log, requests/<run>.jsonl)"
