#!/usr/bin/env bash
# One device call's worth of the queued GPU work, in order, each step under its own time limit, so a session's
# 30 device-minutes go to measurements and not to failed calls. Every step writes OUT/<step>.log; OUT/session.md
# gets one line per step (rc, seconds) and the machine's facts. A failed or timed-out step does not stop the
# next one.
#
#   PI05_GIT_COMMIT=<hash> bash tools/gpu_session.sh OUT_DIR STEP [STEP ...]
#
# Steps (limits in seconds; a device call runs at most 600, so split them over calls):
#   tests    pytest -m gpu test/gpu -v                  (580; 225 s on a warm H100 at 2f36a68, 411 s on a fresh one
#            at 9bad473, where inductor's compile workers then held the exit past 420 s: test/gpu/conftest.py now
#            ends the process once pytest has reported; the fused-MLP and FP8-prefix tests since build three more
#            pipelines: if it runs out, split with TESTS_ARGS); TESTS_ARGS adds pytest
#            options, e.g. TESTS_ARGS="-k batch_buckets" for the tests a short call left out
#   tests-kernels, tests-pipeline   the same tests in two halves of ~22 each (test_attention.py +
#            test_expert_kernels.py; test_pipeline.py + test_worker.py), for a cold machine where all 44 do not fit
#            one call   (580 each)
#   inductor-options, inductor-options-1  tools/batch_stages_gpu.py --variants inductor at bucket 8 or 1: the vision,
#            prefix and expert stacks compiled with programmatic dependent launch on inductor's Triton kernels, with
#            coordinate-descent tuning of its pointwise/reduction kernels, and both, beside the baseline   (580)
#   kernels  tools/expert_kernels_gpu.py --variants     (300): the denoise loop, default and options
#   kernels-batch  tools/expert_kernels_gpu.py --batches (360): batches of 2-8 on the torch path and the kernels'
#            batch shapes (which to make the default, and whether batches should run on the kernels at all)
#   kernels-batch-k  tools/expert_kernels_gpu.py --batch-k (200; 173 s on an H100 incl. start): batch 8 with the
#            batch K options (§49)
#   kernels-batch-gemms  tools/expert_kernels_gpu.py --batch-gemms (240): batch 8, each kernel kind's time per layer
#            beside cuBLAS at M = 400: where the batched kernels lose to the torch path
#   batch-tune  tools/expert_kernels_gpu.py --batch-tune --tune-batches 8,2,4 (420; 218 s with 12 shapes on an H100,
#            §76): each GEMM kind at every TUNE_SHAPES batch shape, the best per kind put together, the denoise loop
#            on it beside the torch path (§76: the default 2x1 shape stays the fastest at 2 rows)
#   geglu-deep  tools/geglu_gpu.py --deep (150): the prefix MLP kernel's second tile sweep (§74)
#   kernels-attention  tools/expert_kernels_gpu.py --attention (150): the expert attention's key splits, blocks and
#            warps, to re-tune KernelConfig now that only blocks holding valid keys are shared out (§57)
#   stream-floor  tools/stream_floor_gpu.py (180): one persistent CUDA kernel streaming a step's expert weights
#            (bulk copies into a shared-memory ring), without and with a grid-wide wait between GEMMs: the floor of
#            a megakernel step before one is built (needs nvcc, which the GPU machine has)
#   gemm-chain  tools/gemm_chain_gpu.py --json OUT/gemm-chain.json (150): a step's 72 expert GEMMs in one
#            persistent CUDA kernel with the math (mma, stream-K atomics, a grid-wide wait per GEMM), checked against
#            torch, beside the same kernel without math and cuBLAS's chain of the same GEMMs (needs nvcc)
#   geglu    tools/geglu_gpu.py (150): the prefix MLP's FP8 gate_up + GeGLU kernel against the torch path at 528, 1056
#            and 4224 rows, over tile configs and the float32-per-step accumulation option (§63)
#   gelu     tools/geglu_gpu.py --gelu (150): SigLIP's MLP at 512 and 4096 rows, bf16 (fc1 GELU epilogue) against
#            FP8 with two GEMMs and FP8 with fc1's bias + GELU + fc2's input quantization in the kernel's GELU form
#   vision-mlp  tools/batch_stages_gpu.py --variants "prefix MLP + SigLIP" at buckets 1 and 8: the pipeline with
#            SigLIP's MLP in FP8, two GEMMs or fused, beside the baseline   (480)
#   residual-carry  tools/batch_stages_gpu.py --variants carry at buckets 1 and 8: the baseline (each layer's last
#            residual add in the next layer's first norm, the default since §70) beside the carry off   (300)
#   prefix-mlp  tools/batch_stages_gpu.py --variants "prefix MLP:,fp8 prefix all linears" at buckets 1 and 8: the
#            baseline (the prefix MLP's GeGLU in its FP8 GEMM on Hopper, the default since §70) beside its two GEMMs,
#            and with Gemma's qkv and o in FP8 too, each on a fresh model   (480)
#   options, options-1  tools/batch_stages_gpu.py --variants at bucket 8 (options) or 1 (options-1): the opt-in
#            options (FP8 in all of Gemma's linears, SigLIP's MLP in FP8 with two GEMMs or fused) alone and at once,
#            each default of §70 off (the prefix MLP fused, the residual carry, the prefill's runs walk), and both
#            stacks on the flash kernel on either walk, beside the baseline, one process   (580)
#   attention  tools/attention_gpu.py: the GEMM path, SDPA and the flash kernel (each key walk) alone at the
#            pipeline's shapes (150)
#   attention-pipeline  tools/attention_gpu.py --batches 1,8 --ways gemm,flash-runs at the pipeline's prefill
#            shapes (560 tokens, K/V sliced from 832-row caches), with one input set and with 4 (no operand left in
#            L2 by the call before): why the flash kernel took 99.5 us a layer in §76's pipeline and 62.8 alone (150)
#   attention-sweep  tools/attention_gpu.py --sweep --iters 50: the flash kernel's tile shapes with the measured key
#            walk and the walk over the mask's runs (whose loop has no branch, so Triton can pipeline it)   (300)
#   flash-walks  tools/batch_stages_gpu.py at buckets 1 and 8: both stacks on the flash kernel with either walk
#            (--variants "flash attention"), and at 8 the flash prefill on the skip walk ("walk"), beside the
#            baseline (its prefill on the runs walk on Hopper, the default since §70)   (480)
#   batch    tools/batch_stages_gpu.py, buckets 1-8: batches as pi05-serve denoises them (auto: the kernels up to
#            2 rows on Hopper, the torch path from 4) and all on the fused kernels (--expert-kernels on), one process
#            each   (420)
#   batch-variants  tools/batch_stages_gpu.py --buckets 8 --variants expert: a batch of 8 with inductor's GEMM
#            autotuning on the expert (and vision) layers, and FP8 in the expert   (540)
#   vision-variants  tools/batch_stages_gpu.py --buckets 8 --variants "vision fc1,vision attention": a batch of 8
#            with SigLIP's fc1 GELU as its own kernel (before §56), its attention on FlashAttention-2 or on contiguous
#            q/k/v; each row's actions against a baseline (160 s on an H100 with the prefix max-autotune too)   (540)
#   lanes    tools/concurrent_lanes_gpu.py: lanes (pipelines on streams of their own, one thread each) at once
#            against one batch of as many rows, the denoise on the lane's stream or a high-priority one; actions
#            checked against each lane alone. LANES_CONFIGS, LANES_ITERS   (540; 78 s on an H100 with 3 configs,
#            §86: two lanes of 4 slower than one batch of 8)
#   serve    tools/serve_bench.sh, fp8, 10 steps, 1/2/4/8 clients, batched and unbatched   (480)
#   serve-batched  the same, batched only, SERVE_CLIENTS (default 1 2 4 8): the one-process server beside serve-ray
#            (360)
#   serve-ray, serve-ray-proxy, serve-ray-batch  the same load through `pi05-serve --ray --replicas <the machine's
#            GPUs>` (one replica a GPU), SERVE_CLIENTS as serve-batched: Serve's HAProxy ingress (the default) or
#            its Python proxy, this package's
#            batching or Ray's @serve.batch (with HAProxy)   (480 each; needs Ray there: carry `gpu_carry.sh ray-a`
#            in one call, then `ray-b` in the next, see gpu_ros_bundle.sh)
#   ray-ingress  tools/ray_ingress_overhead.py: one 300 KB websocket round trip through plain uvicorn, Serve's Python
#            proxy and its HAProxy ingress, no model (needs Ray, as serve-ray)   (180)
#   serve-kernels  the same server, batched only, 1/4/8 clients, with --expert-kernels on --fp8-vision   (360)
#   bench    pi05-bench --iters 1000                    (480)
#   bench-mlp  pi05-bench --precision fp8,fp8+unfused-mlp --steps 1,10 --iters 300: issue 12's end-to-end figures
#            with the prefix MLP fused (the default on Hopper) and without, one run; BENCH_PRECISION overrides the list (e.g.
#            fp8,fp8+unfused-mlp+no-residual-carry: the defaults of §70 against the two they replaced)   (420)
#   soak-arrival, soak-inference   tools/soak.py --gpu, 10 steps at 30 Hz, SOAK_N inferences (default 3000), with
#            prepare_views on_arrival / in_inference: the node's latency and stages either way (needs .gpu_ros)  (360)
# Step limits can be changed with LIMIT_<STEP>=seconds.
#
# The GPU machine's .git is stale, so the commit comes from PI05_GIT_COMMIT (reports name it). The serve and
# soak steps need websockets, and soak needs ROS: build `.gpu_ros` (PYENV_VERSION=3.12.1 bash
# tools/gpu_ros_bundle.sh), carry what `bash tools/gpu_carry.sh serve|ros` prints (the tree and the whole bundle pass
# the device's 64 MiB), and this script sources its --activate when it is there.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: PI05_GIT_COMMIT=<hash> gpu_session.sh OUT_DIR STEP [STEP ...]}"
shift
STEPS="tests tests-kernels tests-pipeline kernels kernels-attention stream-floor gemm-chain geglu gelu vision-mlp residual-carry prefix-mlp options options-1 inductor-options inductor-options-1 kernels-batch kernels-batch-k kernels-batch-gemms batch-tune geglu-deep attention attention-pipeline attention-sweep flash-walks batch batch-variants
vision-variants lanes serve serve-batched serve-ray serve-ray-proxy serve-ray-batch ray-ingress serve-kernels bench bench-mlp soak-arrival soak-inference"  # the steps the loop at the end runs
STEPS="${STEPS//$'\n'/ }"
[[ $# -gt 0 ]] || { echo "gpu_session.sh: name at least one step: $STEPS" >&2; exit 2; }
[[ -n "${PI05_GIT_COMMIT:-}" ]] || { echo "gpu_session.sh: set PI05_GIT_COMMIT=<the commit under test>" >&2; exit 2; }
for step in "$@"; do
  [[ " $STEPS " == *" $step "* ]] || { echo "gpu_session.sh: unknown step $step" >&2; exit 2; }
done
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PI05_GIT_COMMIT
PY="${PYTHON:-python3}"
SUMMARY="$OUT/session.md"
if [[ -d .gpu_ros ]]; then
  # shellcheck disable=SC1091
  source tools/gpu_ros_bundle.sh --activate > "$OUT/gpu_ros.log" 2>&1 || echo "(.gpu_ros did not activate: $OUT/gpu_ros.log)"
  # The bundle holds a colcon build of this package: the node runs that copy, not the tree's sources. (The
  # message type support colcon generates there is no source of ours: not compared.)
  built=.gpu_ros/install/pi05_ros/lib/python3.12/site-packages/pi05_ros
  if [[ -d .gpu_ros/install ]] && ! diff -rq --exclude=__pycache__ --exclude=msg --exclude='*.so' --exclude='_pi05_ros_s.ep.*' "$built" pi05_ros > "$OUT/gpu_ros_stale.txt" 2>&1; then
    echo "WARNING: .gpu_ros was built from other sources than this tree (rebuild it: PYENV_VERSION=3.12.1 bash" \
      "tools/gpu_ros_bundle.sh); the differences: $OUT/gpu_ros_stale.txt" | tee -a "$OUT/session.md"
  fi
fi
{
  echo "# GPU session, commit $PI05_GIT_COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/- gpu: /'
  "$PY" -c "import torch, triton; print(f'- torch {torch.__version__}, triton {triton.__version__}')" 2>&1
  echo "- steps: $*"
  echo
  echo "| step | rc | seconds | log |"
  echo "|---|---|---|---|"
} >> "$SUMMARY"

run_step() {  # name limit command...
  local name="$1" limit="$2"
  shift 2
  local var="LIMIT_${name^^}"
  var="${var//-/_}"
  limit="${!var:-$limit}"
  echo "== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | $rc$([[ $rc == 124 ]] && echo ' (timed out)') | $((SECONDS - start)) | $name.log |" >> "$SUMMARY"
  tail -n 25 "$OUT/$name.log"
  echo "== $name: rc $rc in $((SECONDS - start)) s"
}

for step in "$@"; do
  case "$step" in
    # -v: a run cut short by its limit still names each test that passed
    tests) read -ra tests_args <<< "${TESTS_ARGS:-}"  # split on whitespace: no quotes, no globbing
           run_step tests 580 "$PY" -m pytest -m gpu test/gpu -v -s -p no:cacheprovider --durations=10 \
             "${tests_args[@]}" ;;
    tests-kernels|tests-pipeline)
      files=(test/gpu/test_attention.py test/gpu/test_expert_kernels.py)
      [[ "$step" == tests-pipeline ]] && files=(test/gpu/test_pipeline.py test/gpu/test_worker.py)
      run_step "$step" 580 "$PY" -m pytest -m gpu "${files[@]}" -v -s -p no:cacheprovider --durations=10 ;;
    geglu) OUT="$OUT" run_step geglu 150 "$PY" tools/geglu_gpu.py ;;
    gelu) OUT="$OUT" run_step gelu 150 "$PY" tools/geglu_gpu.py --gelu --calls 27 ;;
    vision-mlp) OUT="$OUT" run_step vision-mlp 480 bash -c "'$PY' tools/batch_stages_gpu.py --buckets 1 --iters 30 \
                  --variants 'prefix MLP + SigLIP' && '$PY' tools/batch_stages_gpu.py --buckets 8 --iters 20 \
                  --variants 'prefix MLP + SigLIP'" ;;
    residual-carry) OUT="$OUT" run_step residual-carry 300 bash -c "'$PY' tools/batch_stages_gpu.py --buckets 1 \
                      --iters 30 --variants carry && '$PY' tools/batch_stages_gpu.py --buckets 8 --iters 20 \
                      --variants carry" ;;
    prefix-mlp) OUT="$OUT" run_step prefix-mlp 480 bash -c "'$PY' tools/batch_stages_gpu.py --buckets 1 --iters 30 \
                  --variants 'prefix MLP:,fp8 prefix all linears' && '$PY' tools/batch_stages_gpu.py --buckets 8 \
                  --iters 20 --variants 'prefix MLP:,fp8 prefix all linears'" ;;
    options|options-1)
      bucket=8; iters=20; [[ "$step" == options-1 ]] && { bucket=1; iters=30; }
      OUT="$OUT" run_step "$step" 580 "$PY" tools/batch_stages_gpu.py --buckets "$bucket" --iters "$iters" \
        --variants "all options,fp8 prefix all linears,prefix MLP:,SigLIP,residual carry,flash" ;;
    inductor-options|inductor-options-1)
      bucket=8; iters=20; [[ "$step" == inductor-options-1 ]] && { bucket=1; iters=30; }
      OUT="$OUT" run_step "$step" 580 "$PY" tools/batch_stages_gpu.py --buckets "$bucket" --iters "$iters" \
        --variants inductor ;;
    kernels) OUT="$OUT" run_step kernels 300 "$PY" tools/expert_kernels_gpu.py --variants ;;
    kernels-attention) OUT="$OUT" run_step kernels-attention 150 "$PY" tools/expert_kernels_gpu.py --attention ;;
    stream-floor) run_step stream-floor 180 "$PY" tools/stream_floor_gpu.py ;;
    gemm-chain) run_step gemm-chain 150 "$PY" tools/gemm_chain_gpu.py --json "$OUT/gemm-chain.json" ;;
    kernels-batch) OUT="$OUT" run_step kernels-batch 360 "$PY" tools/expert_kernels_gpu.py --batches ;;
    kernels-batch-k) OUT="$OUT" run_step kernels-batch-k 200 "$PY" tools/expert_kernels_gpu.py --batch-k ;;
    kernels-batch-gemms) OUT="$OUT" run_step kernels-batch-gemms 240 "$PY" tools/expert_kernels_gpu.py --batch-gemms ;;
    batch-tune) OUT="$OUT" run_step batch-tune 420 "$PY" tools/expert_kernels_gpu.py --batch-tune --tune-batches 8,2,4 ;;
    geglu-deep) OUT="$OUT" run_step geglu-deep 150 "$PY" tools/geglu_gpu.py --deep ;;
    attention) OUT="$OUT" run_step attention 150 "$PY" tools/attention_gpu.py ;;
    attention-pipeline) OUT="$OUT" run_step attention-pipeline 150 bash -c "'$PY' tools/attention_gpu.py --batches 1,8 \
                          --ways gemm,flash-runs --tokens 560 --cache-rows 832 && '$PY' tools/attention_gpu.py \
                          --batches 1,8 --ways gemm,flash-runs --tokens 560 --cache-rows 832 --input-sets 4 \
                          --json attention_sets4.json" ;;
    attention-sweep) OUT="$OUT" run_step attention-sweep 300 "$PY" tools/attention_gpu.py --sweep --iters 50 ;;
    flash-walks) OUT="$OUT" run_step flash-walks 480 bash -c "'$PY' tools/batch_stages_gpu.py --buckets 1 --iters 30 \
                   --variants 'flash attention' && '$PY' tools/batch_stages_gpu.py --buckets 8 --iters 20 --variants walk" ;;
    batch) OUT="$OUT" run_step batch 420 bash -c "'$PY' tools/batch_stages_gpu.py --expert-kernels auto && \
             '$PY' tools/batch_stages_gpu.py --expert-kernels on --buckets 2,4,8" ;;
    batch-variants) OUT="$OUT" run_step batch-variants 540 "$PY" tools/batch_stages_gpu.py --buckets 8 --iters 20 \
                      --variants expert ;;
    vision-variants) OUT="$OUT" run_step vision-variants 540 "$PY" tools/batch_stages_gpu.py --buckets 8 --iters 20 \
                       --variants "vision fc1,vision attention" ;;
    lanes) OUT="$OUT" run_step lanes 540 "$PY" tools/concurrent_lanes_gpu.py --iters "${LANES_ITERS:-40}" \
        --configs "${LANES_CONFIGS:-1x8,2x4,2x4p,1x4,2x2p}" ;;
    serve) run_step serve 480 bash tools/serve_bench.sh "$OUT/serve" --device cuda --precision fp8 ;;
    serve-batched) run_step serve-batched 360 bash tools/serve_bench.sh "$OUT/serve-batched" --device cuda \
                     --precision fp8 --modes batched --clients "${SERVE_CLIENTS:-1 2 4 8}" ;;
    serve-ray|serve-ray-proxy|serve-ray-batch)
      gpus="$(nvidia-smi -L | grep -c '^GPU')"
      batching=ours; [[ "$step" == serve-ray-batch ]] && batching=ray
      ingress=haproxy; [[ "$step" == serve-ray-proxy ]] && ingress=proxy
      run_step "$step" 480 bash tools/serve_bench.sh "$OUT/$step" --device cuda --precision fp8 --modes batched \
        --clients "${SERVE_CLIENTS:-1 2 4 8}" --server-args "--ray --replicas $gpus --ray-batching $batching --ray-ingress $ingress" ;;
    ray-ingress) run_step ray-ingress 180 "$PY" tools/ray_ingress_overhead.py --json "$OUT/ray-ingress.json" ;;
    serve-kernels) run_step serve-kernels 360 bash tools/serve_bench.sh "$OUT/serve-kernels" --device cuda \
                     --precision fp8 --modes batched --clients "1 4 8" --server-args "--expert-kernels on --fp8-vision" ;;
    bench) run_step bench 480 "$PY" -m pi05_ros.cli.bench --iters 1000 --out "$OUT/bench" ;;
    bench-mlp) run_step bench-mlp 420 "$PY" -m pi05_ros.cli.bench --precision "${BENCH_PRECISION:-fp8,fp8+unfused-mlp}" \
                 --steps 1,10 --iters 300 --out "$OUT/bench-mlp" ;;
    soak-arrival|soak-inference)
      views=on_arrival; [[ "$step" == soak-inference ]] && views=in_inference
      mkdir -p "$OUT/$step"
      run_step "$step" 360 "$PY" tools/soak.py --gpu --steps 10 --rate 30 --inferences "${SOAK_N:-3000}" \
        --param "prepare_views:=$views" --partial-every 60 --out "$OUT/$step/soak" ;;
  esac
done
cat "$SUMMARY"
