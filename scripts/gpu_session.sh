#!/usr/bin/env bash
# Every GPU measurement the open issues need, in few device calls (each under 10 minutes), results in
# $OUT (the device tool brings that folder back). Run from the repository root on a lent machine with
# `.whl` carried (scripts/fetch_device_wheels.sh):
#
#   bash scripts/gpu_session.sh tests      # any 1-2 GPU machine: make test-gpu (kernels, engine, transports, TP)
#   bash scripts/gpu_session.sh engine     # one H200: decode/prefill steps vs bounds; sampler paths
#   bash scripts/gpu_session.sh transfer   # 2x H200: KV hand-off GPU0 -> GPU1 per transport
#   bash scripts/gpu_session.sh sweep [B]  # one GPU: decode attention tiles and splits around the defaults
#   bash scripts/gpu_session.sh handoff    # 2x H200: TTFT added by disaggregation, with/without layer streaming
#   bash scripts/gpu_session.sh abtree DIR   # one H200 (~9 min): engine table of the tree in DIR vs this one
#   bash scripts/gpu_session.sh httptree DIR # one GPU (~3 min): 7B through HTTP, the tree in DIR vs this one
#   bash scripts/gpu_session.sh ab KERNELS [SHAPES] [BATCHES]  # one GPU (~1 min a shape and side):
#                                           decode steps, the default kernels vs KERNELS (a KernelConfig
#                                           spec for gpu_engine.py --kernels), alternating, 2 rounds
#                                           (default 7B and 32B, B=1,8); e.g. ab pdl=off qwen2.5-7b 1,32,128
#                                           or ab gated_rows=off qwen2.5-7b 32,64 (tuning=FILE: other tables)
#   bash scripts/gpu_session.sh next       # one H200 (~6 min): engine, then the attention sweep at B=32
#   bash scripts/gpu_session.sh gated      # one H200 (~6 min): gate_up + SiLU fused at 17-64 rows, alone and in the engine
#   bash scripts/gpu_session.sh gated3     # one H200 (~3 min): the same microbenchmark on the Qwen3 shapes
#   bash scripts/gpu_session.sh cublas     # one H200 (~4 min): cuBLAS forms of the 7B projections at 64/128 rows
#   bash scripts/gpu_session.sh llama      # one H200 (~3 min): the Llama-3.1-8B shape: engine table, gated microbenchmark
#   bash scripts/gpu_session.sh splitk     # one H200 (~7 min): down_proj as partial sums reduced in the norm
#                                           (kernels/split_k.py): its GPU tests, the microbenchmark at
#                                           72-256 rows, then the engine A/B (ab split_norm=off) for 7B at 128
#   bash scripts/gpu_session.sh newtoken   # one H200 (~3 min): the decode kernel taking the rotary launch
#                                           (kernels/attention/triton_new_token.py, the default): its GPU
#                                           tests, then ab decode_rotary=off on 7B and Qwen3-8B at B=1,32,128
#   bash scripts/gpu_session.sh loop [MODEL] [REP]  # one GPU: the serving loop, overlapped vs waiting, 3 pairs
#                                           (REP: a repetition penalty on every row, e.g. 1.05)
#   bash scripts/gpu_session.sh multiturn [KV]  # one H200 (~5 min; an H100 with KV=2GiB): 2P2D of 7B on one GPU, 64x6 chat turns, round_robin vs cache_aware
#   bash scripts/gpu_session.sh resume     # one GPU (~3 min): the cost of a resume, 1P2D of 7B sharing the GPU
#   bash scripts/gpu_session.sh structured # one GPU (~2 min): decode step with half the batch JSON-constrained vs none, B=32,128
#   bash scripts/gpu_session.sh frontab    # one GPU (~8 min): 7B through HTTP, engine thread vs --engine-process (issue 30)
#   bash scripts/gpu_session.sh front      # one GPU (~6 min): 7B offline vs through HTTP at 64 and 256 streams of
#                                           1000 + 256 tokens, py-spy profiles of both (issue 30's split)
#   bash scripts/gpu_session.sh moe        # one H100/H200 (~5 min): fused MoE block and whole-model steps, qwen3-30b-a3b and ernie-4.5-21b-a3b
#   bash scripts/gpu_session.sh newgpu     # one GPU (~3 min): the GPU tests of the MoE, weight-quantized and fp8 KV paths
#   bash scripts/gpu_session.sh verify     # one GPU (~9 min): the GPU tests of the quantized decode kernels, MoE
#                                           quant and fp8 KV scales (with attention); quant_gpu --sweep (tiles to
#                                           paste into triton_wquant_plan.PLANS); the router at 256 streams
#                                           (front_ab); the MoE block per quantized format
#   bash scripts/gpu_session.sh compare MODEL LAYOUTS GPUS RATES PROMPTS [ARRIVAL_SECONDS]
#        e.g. compare qwen2.5-32b colocated:2,pd:1:1 0,1 1,2,4,8 64    (2x H200, issue 5)
#             compare qwen2.5-32b colocated:3,pd:2:1 0,1,2 1,2,4,8 64  (4x H200, issue 6)
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
source scripts/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpus.csv" 2>&1

serve_7b() {  # LOG [SERVE OPTIONS...]: a Qwen2.5-7B server (dummy weights) on port 8011, in the
  # background as $server; returns once it answers /health (or has exited)
  local log=$1 health="import urllib.request as u; u.urlopen('http://127.0.0.1:8011/health', timeout=2)"
  shift
  timeout 200 python3 -m pdserve.cli serve --model qwen2.5-7b --load-format dummy --device cuda --port 8011 \
    --tokenizer .whl/tokenizer "$@" >"$log" 2>&1 &
  server=$!
  until python3 -c "$health" 2>/dev/null; do sleep 0.5; kill -0 "$server" 2>/dev/null || break; done
}

case "${1:-tests}" in
tests)
  timeout 540 make test-gpu GPU_PYTHON=python3 >"$OUT/test_gpu.log" 2>&1
  echo "rc=$?" >>"$OUT/test_gpu.log"
  tail -30 "$OUT/test_gpu.log"
  ;;
engine)
  timeout 560 python3 benchmarks/gpu_engine.py --shapes qwen2.5-7b,qwen2.5-32b \
    --output "$OUT/gpu_engine.json" >"$OUT/gpu_engine.log" 2>&1
  echo "rc=$?" >>"$OUT/gpu_engine.log"
  timeout 120 python3 benchmarks/sampler_gpu.py --output "$OUT/sampler_gpu.json" >>"$OUT/gpu_engine.log" 2>&1
  tail -30 "$OUT/gpu_engine.log"
  ;;
transfer)
  timeout 300 python3 benchmarks/kv_transfer_gpu.py --output "$OUT/kv_transfer_gpu.json" \
    >"$OUT/kv_transfer_gpu.log" 2>&1
  echo "rc=$?" >>"$OUT/kv_transfer_gpu.log"
  tail -20 "$OUT/kv_transfer_gpu.log"
  ;;
sweep)  # [BATCHES]: default 1,32,128 (~90 s a shape and batch)
  timeout 560 python3 benchmarks/kernel_bench.py --sweep-decode --batches "${2:-1,32,128}" \
    --output "$OUT/decode_sweep.json" \
    >"$OUT/decode_sweep.log" 2>&1
  echo "rc=$?" >>"$OUT/decode_sweep.log"
  grep -E "default|rc=" "$OUT/decode_sweep.log"
  ;;
handoff)
  timeout 300 python3 benchmarks/handoff_ttft_gpu.py --model qwen2.5-32b --tokens 1100 --repeats 12 \
    --output "$OUT/handoff_ttft.json" >"$OUT/handoff_ttft.log" 2>&1
  echo "rc=$?" >>"$OUT/handoff_ttft.log"
  tail -8 "$OUT/handoff_ttft.log"
  ;;
abtree)  # DIR [SHAPES] [BATCHES]: a restructuring's A/B, ~9 min on one H200: the engine table of the code
  # in DIR (an older commit's `git archive COMMIT pdserve benchmarks | tar -x -C DIR`) and of this tree, in
  # one call: round 1 both with prefill (before, after), round 2 decode only in the other order
  dir=${2:?abtree needs the directory of the other tree} shapes=${3:-qwen2.5-7b,qwen2.5-32b}
  batches=${4:-1,32,128}
  for run in "before 1 --output" "after 1 --output" "after 2 --no-prefill --output" "before 2 --no-prefill --output"; do
    set -- $run
    root=$PWD
    [ "$1" = before ] && root=$PWD/$dir
    echo "== $1 round $2" >>"$OUT/abtree.log"
    (cd "$root" && PYTHONPATH=/tmp/site:$root timeout 170 python3 benchmarks/gpu_engine.py --shapes "$shapes" \
      --batches "$batches" "${@:3}" "$OUT/abtree_$1_$2.json") >>"$OUT/abtree.log" 2>&1
  done
  grep -E "==|decode b|prefill|Error" "$OUT/abtree.log"
  ;;
httptree)  # DIR: one H200/H100 (~3 min): a 7B server (dummy weights) of the tree in DIR and of this one,
  # alternating, two rounds: 512 requests of 256 + 256 tokens sent at once through HTTP
  dir=${2:?httptree needs the directory of the other tree} top=$PWD
  for side in before after before after; do
    root=$top
    [ "$side" = before ] && root=$top/$dir
    (cd "$root" && PYTHONPATH=/tmp/site:$root serve_7b "$OUT/serve_$side.log" --tokenizer "$top/.whl/tokenizer"
      PYTHONPATH=/tmp/site:$root timeout 120 python3 -m pdserve.cli bench serve --base-url http://127.0.0.1:8011 \
        --tokenizer "$top/.whl/tokenizer" --input-len 256 --output-len 256 --ignore-eos --num-prompts 512 \
        --disable-tqdm --label "$side" --output "$OUT/http_$side.json" >"$OUT/bench_$side.log" 2>&1
      echo "== $side"
      grep -iE "output token throughput|mean ttft|mean tpot|error" "$OUT/bench_$side.log" | head -5
      kill "$server" 2>/dev/null
      wait)
  done
  ;;
ab)
  other=${2:?ab needs kernel options, e.g. pdl=off} shapes=${3:-qwen2.5-7b,qwen2.5-32b}
  batches=${4:-1,8}
  label=${other//[^A-Za-z0-9_]/_}
  for i in 1 2; do
    for side in default "$other"; do
      spec=${side#default}
      echo "== $side" >>"$OUT/ab_$label.log"
      timeout 150 python3 benchmarks/gpu_engine.py --kernels "$spec" --shapes "$shapes" --no-prefill \
        --batches "$batches" --output "$OUT/ab_${label}_${side//[^A-Za-z0-9_]/_}_$i.json" \
        >>"$OUT/ab_$label.log" 2>&1
    done
  done
  grep -E "==|decode b|Error" "$OUT/ab_$label.log"
  ;;
splitk)
  python3 -m pytest -q -m gpu tests/kernels/test_split_k.py tests/kernels/test_triton_fused.py \
    tests/engine/test_architectures.py -k "partial or split" 2>&1 | tail -5 | tee "$OUT/splitk_tests.log"
  (cd benchmarks && timeout 200 python3 splitk_norm_bench.py --output "$OUT/splitk_norm_rows.json" \
    --shapes 7b-down,32b-down,qwen3-8b-down,llama-8b-down,qwen3-32b-down \
    --m 72,80,88,96,104,112,120,128,192,256 --splits 2,3,4) >"$OUT/splitk_norm_rows.log" 2>&1
  tail -3 "$OUT/splitk_norm_rows.log"
  GPU_SESSION_NESTED=1 bash "$0" ab split_norm=off qwen2.5-7b "${2:-120,128}"
  ;;
newtoken)
  python3 -m pytest -q tests/kernels/test_triton_attention.py tests/engine/test_architectures.py \
    -k "new_token or fused_decode or rotary_launch" 2>&1 | tail -5 | tee "$OUT/newtoken_tests.log"
  GPU_SESSION_NESTED=1 bash "$0" ab decode_rotary=off qwen2.5-7b,qwen3-8b "${2:-1,32,128}"
  ;;
profile)  # one H200, ~4 min: own kernel times (PDL off) of decode at B=128, 32B with and without the
  # rotary launch in the decode kernel (KernelConfig decode_rotary), then 7B with it
  for run in "qwen2.5-32b 1" "qwen2.5-32b 0" "qwen2.5-7b 1"; do
    set -- $run
    timeout 150 python3 benchmarks/gpu_engine.py --kernels "pdl=off,decode_rotary=$2" --shapes "$1" --no-prefill \
      --batches 128 --profile "$OUT/profile-$1-b128-nopdl-rotary$2.txt" --output "$OUT/profile-$1-$2.json" \
      >>"$OUT/profile.log" 2>&1
  done
  grep -E "decode b|Error" "$OUT/profile.log"
  ;;
maxseqs)  # one H200, ~5 min: the CUDA default of 256 sequences a step (config.default_max_num_seqs): the
  # engine's GPU tests (graphs captured up to 256), 7B steps at B=64..256, a 7B server's start-up time
  if [ "${2:-}" != serve ]; then  # maxseqs serve: the start-up only
    timeout 200 python3 -m pytest -q -m gpu tests/engine -x 2>&1 | tail -3 | tee "$OUT/maxseqs_tests.log"
    timeout 150 python3 benchmarks/gpu_engine.py --shapes qwen2.5-7b --batches 64,128,192,256 --no-prefill \
      --output "$OUT/gpu_engine_256.json" 2>&1 | grep -E "decode b|Error"
  fi
  start=$EPOCHREALTIME
  serve_7b "$OUT/serve_256.log"
  python3 -c "print('7B server healthy after %.1f s' % ($EPOCHREALTIME - $start))"
  grep -E "captured|blocks|Error" "$OUT/serve_256.log" | cut -c1-300
  kill "$server" 2>/dev/null
  wait
  ;;
seqsbench)  # one H200, ~2 min: a 7B server (dummy weights) at --max-num-seqs 64 and at the CUDA default
  # (256), 512 requests of 256 + 256 tokens sent at once: output tokens a second through HTTP
  for seqs in 64 256; do
    serve_7b "$OUT/serve_$seqs.log" --max-num-seqs "$seqs"
    timeout 150 python3 -m pdserve.cli bench serve --base-url http://127.0.0.1:8011 --tokenizer .whl/tokenizer \
      --input-len 256 --output-len 256 --ignore-eos --num-prompts 512 --disable-tqdm --label "seqs$seqs" \
      --output "$OUT/bench_seqs$seqs.json" >"$OUT/bench_seqs$seqs.log" 2>&1
    echo "== max-num-seqs $seqs"
    grep -iE "throughput|ttft|tpot|error" "$OUT/bench_seqs$seqs.log" | head -8
    kill "$server" 2>/dev/null
    wait
  done
  ;;
next)  # one H200, ~6 min: the engine table and sampler paths, then the decode-attention sweep at B=32
  GPU_SESSION_NESTED=1 bash "$0" engine
  GPU_SESSION_NESTED=1 bash "$0" sweep 32
  ;;
gated)  # one H200, ~6 min: gate_up with SiLU * up fused at 32 and 48 rows vs cuBLAS + silu_and_mul
  # (7B, 32B), then the engine A/B (7B B=32,64: kernels/triton_skinny.gated_rows_tile)
  timeout 150 python3 benchmarks/skinny_gemm_bench.py --gated --m 32,48 --models qwen2.5-7b,qwen2.5-32b \
    --output "$OUT/gated_gemm.json" >"$OUT/gated_gemm.log" 2>&1
  grep -v "wrong\|Error" "$OUT/gated_gemm.log" | cut -c1-600
  GPU_SESSION_NESTED=1 bash "$0" ab gated_rows=off qwen2.5-7b 32,64
  ;;
gated3)  # one H200, ~3 min: the gated microbenchmark on the Qwen3 shapes (the tuning has no gated tile for them)
  timeout 200 python3 benchmarks/skinny_gemm_bench.py --gated --m 32,48,64 --models qwen3-8b,qwen3-32b \
    --output "$OUT/gated_gemm_qwen3.json" >"$OUT/gated_gemm_qwen3.log" 2>&1
  grep -v "wrong\|Error" "$OUT/gated_gemm_qwen3.log" | cut -c1-600
  ;;
cublas)  # one H200, ~4 min: cuBLAS / cuBLASLt, x @ W^T vs the swapped W @ x^T, at 64 and 128 rows (7B)
  timeout 240 python3 benchmarks/cublas_forms_bench.py --m 64,128 --models qwen2.5-7b \
    --output "$OUT/cublas_forms.json" >"$OUT/cublas_forms.log" 2>&1
  cut -c1-700 "$OUT/cublas_forms.log"
  ;;
llama)  # one H200, ~3 min: the engine table of the Llama-3.1-8B shape, then the gated gate_up
  # microbenchmark on its shapes (its gated_tiles entry came from this; `ab gated_rows=off llama-3.1-8b 48,64`)
  timeout 200 python3 benchmarks/gpu_engine.py --shapes llama-3.1-8b --output "$OUT/gpu_engine_llama.json" \
    >"$OUT/gpu_engine_llama.log" 2>&1
  echo "rc=$?" >>"$OUT/gpu_engine_llama.log"
  tail -6 "$OUT/gpu_engine_llama.log"
  timeout 200 python3 benchmarks/skinny_gemm_bench.py --gated --m 32,48,64 --models llama-3.1-8b \
    --output "$OUT/gated_gemm_llama.json" >"$OUT/gated_gemm_llama.log" 2>&1
  grep -v "wrong\|Error" "$OUT/gated_gemm_llama.log" | cut -c1-600
  ;;
loop)  # [MODEL] [REPETITION_PENALTY]
  for i in 1 2 3; do
    for flag in "" --no-overlap; do
      timeout 150 python3 benchmarks/engine_loop_gpu.py --model "${2:-qwen2.5-7b}" --batch 128 \
        --output-len 257 --repetition-penalty "${3:-1.0}" $flag --output "$OUT/engine_loop.jsonl" \
        >>"$OUT/engine_loop.log" 2>&1
    done
  done
  cat "$OUT/engine_loop.jsonl"
  ;;
compare)
  model=${2:-qwen2.5-32b} layouts=${3:-colocated:2,pd:1:1} gpus=${4:-0,1} rates=${5:-1,2,4,8}
  prompts=${6:-64} seconds=${7:-}  # seconds: at least this long of arrivals per rate (more prompts at high rates)
  timeout 570 python3 benchmarks/pd_vs_colocated.py --model "$model" --layouts "$layouts" --gpus "$gpus" \
    --rates "$rates" --num-prompts "$prompts" ${seconds:+--arrival-seconds "$seconds"} \
    --tokenizer .whl/tokenizer --out-dir "$OUT/$model" >"$OUT/compare.log" 2>&1
  echo "rc=$?" >>"$OUT/compare.log"
  tail -40 "$OUT/compare.log"
  ;;
multiturn)  # one H200 (~5 min; four 7B instances starting at once on one H100 did not get healthy
  # within 280 s: their logs come back in $OUT): 2 prefill + 2 decode instances of Qwen2.5-7B (dummy weights) sharing the
  # GPU, 64 conversations x 6 turns (benchmarks/multi_turn.py), the router's round_robin vs cache_aware
  for policy in round_robin cache_aware; do
    timeout 280 python3 -m pdserve.cli up --prefill 2 --decode 2 --gpus 0 --port 8700 --policy "$policy" \
      --model qwen2.5-7b --load-format dummy --tokenizer .whl/tokenizer --kv-cache-memory "${2:-12GiB}" --max-num-batched-tokens 2048 \
      --log-dir "/tmp/up-$policy" >"$OUT/up_$policy.log" 2>&1 &
    up=$!
    health="import urllib.request as u; u.urlopen('http://127.0.0.1:8700/health', timeout=2)"
    until python3 -c "$health" 2>/dev/null; do sleep 1; kill -0 "$up" 2>/dev/null || break; done
    timeout 200 python3 benchmarks/multi_turn.py --base-url http://127.0.0.1:8700 --conversations 64 \
      --turns 6 --max-tokens 32 --concurrency 16 --label "$policy" --output "$OUT/multi_turn-$policy.json" \
      >"$OUT/multi_turn-$policy.log" 2>&1
    echo "== $policy rc=$?"
    tail -25 "$OUT/multi_turn-$policy.log"
    kill "$up" 2>/dev/null
    wait "$up"
    for log in /tmp/up-"$policy"/*.log; do tail -40 "$log" >"$OUT/${policy}_$(basename "$log")"; done
  done
  ;;
resume)  # one GPU (~3 min): benchmarks/resume_cost.py with 1 prefill + 2 decode instances of Qwen2.5-7B
  # (dummy weights) sharing the GPU: 16 streams, one decode instance SIGKILLed after 32 tokens of each
  timeout 400 python3 benchmarks/resume_cost.py --streams 16 --max-tokens 128 --kill-after 32 \
    --output "$OUT/resume_cost_gpu.json" -- --device cuda --model qwen2.5-7b --load-format dummy \
    --tokenizer .whl/tokenizer --kv-cache-memory 6GiB >"$OUT/resume_cost_gpu.log" 2>&1
  echo "rc=$?" >>"$OUT/resume_cost_gpu.log"
  tail -30 "$OUT/resume_cost_gpu.log"
  ;;
frontab)  # one GPU (~8 min; ~5 with ROUNDS=1): issue 30's A/B, the engine on a thread vs in its own process
  timeout 580 python3 benchmarks/front_ab.py --rounds "${ROUNDS:-2}" --out "$OUT/front_ab.json" >"$OUT/front_ab.log" 2>&1
  echo "rc=$?" >>"$OUT/front_ab.log"
  tail -12 "$OUT/front_ab.log"
  ;;
structured)
  timeout 300 python3 benchmarks/structured_tpot_gpu.py --batches 32,128 \
    --output "$OUT/structured_tpot.json" >"$OUT/structured_tpot.log" 2>&1
  echo "rc=$?" >>"$OUT/structured_tpot.log"
  tail -5 "$OUT/structured_tpot.log"
  ;;
front)  # [STREAMS] [offline]: the offline engine and the HTTP server on the same work; py-spy (carried
  # wheel) samples both
  spy=/tmp/site/bin/py-spy streams=${2:-64 256}
  for c in $streams; do
    [ "${3:-offline}" = offline ] || break
    timeout 150 "$spy" record --idle --threads --format raw -r 50 -o "$OUT/spy_offline_$c.txt" -- \
      python3 benchmarks/engine_loop_gpu.py --batch "$c" --input-len 1000 --output-len 256 \
      --output "$OUT/front_offline.jsonl" >>"$OUT/front.log" 2>&1 || echo "offline $c rc=$?" >>"$OUT/front.log"
  done
  serve_7b "$OUT/front_serve.log" --max-num-seqs 256
  pid=$(pgrep -f "pdserve.cli serve" | sort -n | tail -1)
  for c in $streams; do
    timeout 60 "$spy" record --idle --threads --format raw -r 50 -d 25 -o "$OUT/spy_http_$c.txt" --pid "$pid" \
      >>"$OUT/front.log" 2>&1 &
    spy_pid=$!
    timeout 150 python3 -m pdserve.cli bench serve --base-url http://127.0.0.1:8011 --tokenizer .whl/tokenizer \
      --input-len 1000 --output-len 256 --ignore-eos --temperature 1 --num-prompts "$c" --max-concurrency "$c" \
      --disable-tqdm --label "http_$c" --output "$OUT/front_http_$c.json" >>"$OUT/front.log" 2>&1
    wait "$spy_pid"
  done
  kill "$server" 2>/dev/null
  wait
  cat "$OUT/front_offline.jsonl"
  grep -iE "output token throughput|mean tpot|benchmark duration|error" "$OUT/front.log" | head -20
  ;;
moe)
  timeout 420 python3 benchmarks/moe_gpu.py --out "$OUT/moe.json" >"$OUT/moe.log" 2>&1
  echo "rc=$?" >>"$OUT/moe.log"
  tail -30 "$OUT/moe.log"
  ;;
verify)
  timeout 160 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_triton_wquant_skinny.py \
    tests/kernels/test_triton_wquant.py tests/kernels/test_triton_moe_quant.py tests/kernels/test_triton_moe.py \
    tests/kernels/test_kv_scales.py tests/kernels/test_kv_fp8.py tests/kernels/test_triton_attention.py \
    tests/engine/test_quantization.py tests/engine/test_moe_models.py >"$OUT/verify_tests.log" 2>&1
  echo "tests rc=$?"; tail -4 "$OUT/verify_tests.log"
  timeout 210 python3 benchmarks/quant_gpu.py --sweep --sweep-rows 1 --out "$OUT/quant.json" >"$OUT/quant.log" 2>&1
  echo "quant rc=$?"; grep -E "decode B=|prefill 8192|vs bf16" "$OUT/quant.log"
  timeout 135 python3 benchmarks/front_ab.py --modes process --rounds 1 --streams 256 --router-streams 256 \
    --out "$OUT/front_router.json" >"$OUT/front_router.log" 2>&1
  echo "front rc=$?"; tail -4 "$OUT/front_router.log"
  timeout 60 python3 benchmarks/moe_gpu.py --shapes qwen3-30b-a3b --no-model --quantization wint8,wint4,fp8 \
    --out "$OUT/moe_quant.json" >"$OUT/moe_quant.log" 2>&1
  echo "moe rc=$?"; tail -12 "$OUT/moe_quant.log"
  ;;
newgpu)
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_triton_moe.py \
    tests/kernels/test_triton_wquant.py tests/kernels/test_kv_fp8.py tests/engine/test_moe_models.py \
    tests/engine/test_quantization.py >"$OUT/newgpu.log" 2>&1
  echo "rc=$?" >>"$OUT/newgpu.log"
  tail -15 "$OUT/newgpu.log"
  ;;
*)
  echo "unknown phase $1" >&2
  exit 2
  ;;
esac

# The device tool brings back at most 8 files from $OUT: past that, one archive of them all
# (tar -xzf outputs.tgz here); phases called from another phase leave that to the outer one.
if [ -z "${GPU_SESSION_NESTED:-}" ] && [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  tar -czf /tmp/gpu_session_outputs.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete &&
    mv /tmp/gpu_session_outputs.tgz "$OUT/outputs.tgz" && echo "more than 8 files: packed into outputs.tgz"
fi
