#!/usr/bin/env bash
# Issue 17's one prepared GPU run: everything the Triton hot path needs measured, on one H200, in <= 8 minutes.
#
#   bash benchmarks/gpu_check.sh                                  # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --bundle "$OUT/gpu_results.tar.gz"   # also pack the results (the device tool
#                                                                 # brings back at most 8 files)
#   bash benchmarks/gpu_check.sh --cpu-smoke --out /tmp/smoke      # every stage at tiny shapes on CPU
#   bash benchmarks/gpu_check.sh --only kernel,train_smollm2_eager --budget 200
#   bash benchmarks/gpu_check.sh --list
#
# Stages, in order of importance (each with its own timeout, cut to what is left of --budget, so one failure
# or a slow stage cannot eat the rest; every stage's output goes to OUT/<stage>.txt, timings to OUT/summary.txt):
#   checks_op               compiled Triton kernels vs the torch path: every pattern, fp32/fp16/bf16, all gradients
#   checks_compile          torch.compile(fullgraph) through the op: 0 graph breaks, Inductor launches our kernels,
#                           eager-equal; mode="reduce-overhead" (CUDA graphs): captured or not, and eager-equal
#   checks_methods          every method's loss and gradients, Triton vs torch backend
#   kernel                  the op at d=4096 x 8192 tokens bf16, every routing pattern: overhead over the base
#                           linear, Triton vs torch, fraction of the H200 roofline (989 TFLOP/s, 4.8 TB/s)
#   profile                 GPU kernel time vs wall time and launches per call (SMoRA, MixLoRA)
#   train_smollm2_eager     train step of every method vs PEFT LoRA, SmolLM2-135M shape, bf16, torch + Triton
#   train_xlora_eager       X-LoRA vs PEFT X-LoRA (fp32: PEFT's X-LoRA fails in bf16)
#   train_8b_eager          the same at a Llama-3-8B-shaped model (4 layers, random weights)
#   train_smollm2_compiled  compiled steps (bench_train_step.py --compile), SmolLM2 shape: SMoRA vs PEFT LoRA-64
#                           on both backends (Inductor compiles each model: widen COMPILED when time allows)
#   train_8b_compiled       compiled steps, 8B shape (the same cases)
# The train-step stages pass --batches instruction and --compile to bench_train_step.py; where that script
# does not have a flag yet, the stage says so (and runs without --batches, or is skipped without --compile).
#
# Exit code: 0 when every stage passed or was skipped with a reason, 1 when one failed or timed out, 2 for bad
# arguments.

set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=gpu
OUT=""
BUDGET=""
ONLY=""
BUNDLE=""
STAGES=(checks_op checks_compile checks_methods kernel profile train_smollm2_eager train_xlora_eager train_8b_eager
        train_smollm2_compiled train_8b_compiled)

usage() { sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=smoke ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT="$2"; shift ;;
    --budget) [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] || die "--budget needs whole seconds"; BUDGET="$2"; shift ;;
    --only) [ $# -ge 2 ] || die "--only needs stage names (comma-separated)"; ONLY="$2"; shift ;;
    --bundle) [ $# -ge 2 ] || die "--bundle needs a .tar.gz path"; BUNDLE="$2"; shift ;;
    --list) printf '%s\n' "${STAGES[@]}"; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
if [ -n "$ONLY" ]; then
  for s in ${ONLY//,/ }; do
    [[ " ${STAGES[*]} " == *" $s "* ]] || die "unknown stage '$s' in --only; stages: ${STAGES[*]}"
  done
fi
if [ "$MODE" = gpu ]; then
  OUT="${OUT:-benchmarks/results/gpu}"; BUDGET="${BUDGET:-480}"
else
  OUT="${OUT:-$(mktemp -d /tmp/gpu-check-smoke.XXXXXX)}"; BUDGET="${BUDGET:-720}"
fi
mkdir -p "$OUT" || die "cannot create $OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
FAILED=0

# The GPU machine starts bare: make `moelora` (kernels included) importable offline.
if ! "$PY" -c "import moelora.kernels" 2>/dev/null; then
  echo "installing moelora (no dependencies, offline) for $PY"
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" >"$OUT/install.txt" 2>&1; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/moelora-site "$ROOT" \
      >>"$OUT/install.txt" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/moelora-site"
  fi
  "$PY" -c "import moelora.kernels" || { echo "cannot import moelora.kernels (see $OUT/install.txt)"; exit 1; }
fi

{
  echo "mode $MODE, started $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, '|',
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

record() {  # stage status seconds [note]
  printf '%-24s %-12s %5ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$SUMMARY"
}

skip() {  # stage reason
  wanted "$1" || return 0
  record "$1" "SKIP" 0 "$2"
}

stage() {  # stage timeout_s command...: run it with its timeout, cut to what is left of the budget
  local name="$1" limit="$2"; shift 2
  wanted "$name" || return 0
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 5 ]; then record "$name" "SKIP" 0 "budget of ${BUDGET}s spent"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  local t0=$(date +%s) rc
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  tail -n 15 "$OUT/$name.txt" | sed 's/^/   /'
  if [ $rc -eq 0 ]; then record "$name" "ok" "$took"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$name" "TIMEOUT" "$took" "after ${limit}s"; FAILED=1
  else record "$name" "FAILED" "$took" "exit $rc, see $name.txt"; FAILED=1; fi
}

# Which of the flags another change adds to bench_train_step.py exist yet.
TRAIN_HELP="$("$PY" benchmarks/bench_train_step.py --help 2>&1)"
has_flag() { [[ "$TRAIN_HELP" == *"$1"* ]]; }
BATCHES=()
if has_flag "--batches"; then BATCHES=(--batches instruction)
else echo "note: bench_train_step.py has no --batches yet: train steps use its default (random-token) batches"; fi

if [ "$MODE" = gpu ]; then
  CHECKS=("$PY" -m tests.kernels.gpu_checks)
  KERNEL=("$PY" benchmarks/bench_kernel.py --peak-tflops 989 --peak-tbps 4.8 --rep-ms 100 --out "$OUT/kernel.json")
  PROFILE=("$PY" benchmarks/profile_kernel.py --patterns smora_r64_k8 mixlora_pool64_r8_sep --iters 10)
  TRAIN=("$PY" benchmarks/bench_train_step.py --device cuda --dtype bf16 --no-memory)
  EAGER_BACKENDS=(--backends torch triton)
  SMOL=(--base random-smollm2-135m --batch 8 --seq 512 --steps 5 --warmup 2)
  BIG=(--base random-llama3-8b-shape --batch 4 --seq 512 --steps 4 --warmup 2)
  ROUTED=(lora64 smora64_8 lora_mixer mixlora modality)
  # Inductor compiles a whole model per case and backend (tens of seconds each at 30 layers): SMoRA and its peer
  # first; widen this list in a later run if time is left.
  COMPILED=(--cases smora64_8)
  COMPILED_BACKENDS=(--backends torch triton)
  XLORA=("$PY" benchmarks/bench_train_step.py --device cuda --dtype fp32 --no-memory --backends torch triton
         --base random-smollm2-135m --batch 8 --seq 512 --steps 4 --warmup 2 --cases xlora)
  T=(80 55 30 30 15 50 20 40 90 70)  # seconds per stage, 480 in all (kernel JIT and Inductor compiles included)
else  # the same stages at tiny shapes on CPU: the kernels under Triton's interpreter
  export TRITON_INTERPRET=1
  CHECKS=("$PY" -m tests.kernels.gpu_checks --cpu-smoke)
  KERNEL=("$PY" benchmarks/bench_kernel.py --device cpu --tokens 16 --d 16 --patterns mixlora_pool64_r8_sep
          --out "$OUT/kernel.json")
  PROFILE=()
  TRAIN=("$PY" benchmarks/bench_train_step.py --device cpu --dtype fp32 --no-memory)
  EAGER_BACKENDS=(--backends torch triton)
  SMOL=(--base tiny-random-llama --batch 2 --seq 16 --steps 1 --warmup 0 --threads 1)
  BIG=("${SMOL[@]}")
  ROUTED=(smora64_8)
  COMPILED=(--cases lora8)  # Inductor's CPU compile takes a minute per model here: the smallest case,
  COMPILED_BACKENDS=(--backends triton)  # on our Triton path (the op inside an Inductor graph)
  XLORA=()
  T=(60 60 60 60 0 90 0 90 180 180)
fi

stage checks_op "${T[0]}" "${CHECKS[@]}" op
stage checks_compile "${T[1]}" "${CHECKS[@]}" compile
stage checks_methods "${T[2]}" "${CHECKS[@]}" methods
stage kernel "${T[3]}" "${KERNEL[@]}"
if [ ${#PROFILE[@]} -gt 0 ]; then stage profile "${T[4]}" "${PROFILE[@]}"
else skip profile "CUDA only (torch.profiler's GPU kernel times)"; fi
stage train_smollm2_eager "${T[5]}" "${TRAIN[@]}" "${EAGER_BACKENDS[@]}" "${SMOL[@]}" "${BATCHES[@]}" --cases "${ROUTED[@]}" \
  --json "$OUT/train_smollm2_eager.json"
if [ ${#XLORA[@]} -gt 0 ]; then stage train_xlora_eager "${T[6]}" "${XLORA[@]}" "${BATCHES[@]}" \
  --json "$OUT/train_xlora_eager.json"
else skip train_xlora_eager "GPU only (PEFT's X-LoRA over four expert folders is minutes on CPU)"; fi
stage train_8b_eager "${T[7]}" "${TRAIN[@]}" "${EAGER_BACKENDS[@]}" "${BIG[@]}" "${BATCHES[@]}" --cases "${ROUTED[@]}" \
  --json "$OUT/train_8b_eager.json"
if has_flag "--compile"; then
  stage train_smollm2_compiled "${T[8]}" "${TRAIN[@]}" "${COMPILED_BACKENDS[@]}" "${SMOL[@]}" "${BATCHES[@]}" \
    --compile "${COMPILED[@]}" --json "$OUT/train_smollm2_compiled.json"
  stage train_8b_compiled "${T[9]}" "${TRAIN[@]}" "${COMPILED_BACKENDS[@]}" "${BIG[@]}" "${BATCHES[@]}" \
    --compile "${COMPILED[@]}" --json "$OUT/train_8b_compiled.json"
else
  skip train_smollm2_compiled "bench_train_step.py has no --compile yet"
  skip train_8b_compiled "bench_train_step.py has no --compile yet"
fi

TOTAL=$(( $(date +%s) - START ))
echo "total ${TOTAL}s (budget ${BUDGET}s), results in $OUT" | tee -a "$SUMMARY"
if [ -n "$BUNDLE" ]; then
  mkdir -p "$(dirname "$BUNDLE")" && tar -czf "$BUNDLE" -C "$(dirname "$OUT")" "$(basename "$OUT")" \
    && echo "bundled into $BUNDLE"
fi
exit $FAILED
