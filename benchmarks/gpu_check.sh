#!/usr/bin/env bash
# One prepared check on a machine with one CUDA GPU (H100/H200): tests, the trainer end to end, the
# UNet step eager/compiled x stock/optimized, the kernel table -- every log and JSON in one folder.
#
#   benchmarks/gpu_check.sh                      # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --cpu-rehearsal      # here: every stage at its smallest size on the CPU
#   GPU_CHECK_STAGES="trainer_sdxl kernel_table" benchmarks/gpu_check.sh   # only these stages
#
# Output: $OUT when set, else ./gpu-check-out: <stage>.log per stage, the JSON files, summary.txt.
# Time: the whole run stays within GPU_CHECK_BUDGET_S (default 540 s = 9 min; a rehearsal scales the
# budget and every stage's limit by GPU_CHECK_TIMEOUT_SCALE, default 4). Stages run in priority
# order, each under its own `timeout` (one hang cannot eat the budget); a stage that no longer fits
# is skipped and named in the summary with the command that runs it next time.
#
# Needs a Python with a CUDA torch (python3, or $PYTHON). Missing pure-Python dependencies are
# installed from a wheel folder when one is there ($GPU_CHECK_WHEELHOUSE, default ./wheelhouse,
# offline), else from PyPI if it can be reached; the repository itself is used in place (PYTHONPATH).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
REHEARSAL="${GPU_CHECK_REHEARSAL:-0}"
for arg in "$@"; do
  case "$arg" in
    --cpu-rehearsal) REHEARSAL=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
OUT_DIR="${OUT:-$REPO/gpu-check-out}"
mkdir -p "$OUT_DIR"
# Stage limits are sized for the GPU; a CPU rehearsal runs the same stages several times slower.
TIMEOUT_SCALE="${GPU_CHECK_TIMEOUT_SCALE:-$([[ "$REHEARSAL" == 1 ]] && echo 4 || echo 1)}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-$((540 * TIMEOUT_SCALE))}"
START_S=$(date +%s)
DEADLINE_S=$((START_S + BUDGET_S - 10))  # 10 s kept for the summary
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ "$REHEARSAL" == 1 && -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The run's caches (inductor, Triton, generated assets) stay with the run unless the caller set them.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

say() { echo "[gpu_check $(($(date +%s) - START_S))s] $*" | tee -a "$SUMMARY"; }

# ------------------------------------------------------------------------------------ python + torch
say "repo $REPO, output $OUT_DIR, budget ${BUDGET_S}s, rehearsal=$REHEARSAL, python $PYTHON"
if ! command -v "$PYTHON" > /dev/null; then say "FATAL: $PYTHON not found"; exit 3; fi
if [[ "$REHEARSAL" == 1 ]]; then
  TORCH_CHECK="import torch; print('torch', torch.__version__)"
else
  TORCH_CHECK="import torch; assert torch.cuda.is_available(), 'torch.cuda.is_available() is False'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
fi
if ! timeout 120 "$PYTHON" -c "$TORCH_CHECK" >> "$SUMMARY" 2>&1; then
  say "no torch with CUDA in $PYTHON; trying pip install torch (needs PyPI or a wheel folder)"
  timeout 300 "$PYTHON" -m pip install --retries 0 --timeout 15 torch > "$OUT_DIR/pip_torch.log" 2>&1
  if ! timeout 120 "$PYTHON" -c "$TORCH_CHECK" >> "$SUMMARY" 2>&1; then
    say "FATAL: no CUDA-enabled torch and pip could not install one (log: pip_torch.log). Nothing ran."
    say "Run on a machine image with torch (CUDA build), or set PYTHON to a Python that has it."
    exit 3
  fi
fi

# ------------------------------------------------------------------------------ other dependencies
# import name -> distribution name; torch and triton come with the CUDA torch.
DEPS="diffusers:diffusers transformers:transformers peft:peft accelerate:accelerate datasets:datasets
safetensors:safetensors PIL:pillow numpy:numpy tqdm:tqdm pytest:pytest pytest_benchmark:pytest-benchmark"
[[ "$REHEARSAL" == 1 ]] || DEPS="$DEPS triton:triton"
missing_deps() {  # the distributions of DEPS whose module does not import, in one Python start
  "$PYTHON" - $DEPS <<'EOF' 2> /dev/null
import importlib.util, sys
print(" ".join(pair.split(":")[1] for pair in sys.argv[1:] if importlib.util.find_spec(pair.split(":")[0]) is None))
EOF
}
read -r -a missing <<< "$(missing_deps)"
if (( ${#missing[@]} )); then
  WHEELHOUSE="${GPU_CHECK_WHEELHOUSE:-$REPO/wheelhouse}"
  if [[ -d "$WHEELHOUSE" ]]; then
    say "installing ${missing[*]} from $WHEELHOUSE (offline)"
    timeout 240 "$PYTHON" -m pip install --no-index --find-links "$WHEELHOUSE" "${missing[@]}" > "$OUT_DIR/pip_deps.log" 2>&1
  else
    say "installing ${missing[*]} from PyPI"
    timeout 240 "$PYTHON" -m pip install --retries 0 --timeout 15 "${missing[@]}" > "$OUT_DIR/pip_deps.log" 2>&1
  fi
  read -r -a still <<< "$(missing_deps)"
  if (( ${#still[@]} )); then
    say "FATAL: missing ${still[*]} and pip could not install them (log: pip_deps.log). Nothing ran."
    say "Carry a wheel folder: pip download -d wheelhouse --no-deps <those packages and their deps> on a machine with the same Python."
    exit 3
  fi
fi

# -------------------------------------------------------------------------------------------- stages
declare -A RESULT
run_stage() {  # run_stage NAME LIMIT_S NEED_S COMMAND...: run COMMAND under timeout, log to NAME.log
  local name=$1 limit=$(($2 * TIMEOUT_SCALE)) need=$(($3 * TIMEOUT_SCALE))
  shift 3
  if [[ -n "${GPU_CHECK_STAGES:-}" && " $GPU_CHECK_STAGES " != *" ${name%%:*} "* ]]; then
    return 0
  fi
  local left=$((DEADLINE_S - $(date +%s)))
  if (( left < need )); then
    RESULT[$name]="SKIPPED (budget: ${left}s left, needs ${need}s)"
    say "$name: ${RESULT[$name]}"
    return 0
  fi
  (( limit > left )) && limit=$left
  say "$name: start (limit ${limit}s)"
  local t0=$(date +%s) rc=0
  timeout --kill-after=15 "$limit" "$@" > "$OUT_DIR/${name//:/_}.log" 2>&1 || rc=$?
  local took=$(($(date +%s) - t0))
  case $rc in
    0) RESULT[$name]="ok (${took}s)" ;;
    124|137) RESULT[$name]="TIMEOUT after ${took}s (limit ${limit}s)" ;;
    *) RESULT[$name]="FAILED rc=$rc (${took}s)" ;;
  esac
  say "$name: ${RESULT[$name]}; last lines of ${name//:/_}.log:"
  tail -n 4 "$OUT_DIR/${name//:/_}.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  return 0
}
trainer_has_compile() {
  "$PYTHON" -c "import sys; from trainer.args import build_parser; sys.exit('--compile' not in build_parser()._option_string_actions)" 2> /dev/null
}

if [[ "$REHEARSAL" == 1 ]]; then
  UNET_512=(--bench-size smoke)
  UNET_1024=(--bench-size smoke)
  COMPILE_MODE=default
  TEST_FILTER="triton and geglu"   # the interpreter is slow: one op's Triton tests prove the stage
  EMBEDDED_STEPS=3
  SDXL_STEPS=3
else
  UNET_512=(--bench-size full --resolution 512)
  UNET_1024=(--bench-size full --resolution 1024)
  COMPILE_MODE=reduce-overhead
  TEST_FILTER="triton"
  EMBEDDED_STEPS=40
  SDXL_STEPS=30
fi
BENCH=("$PYTHON" -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-columns=median,min,max,rounds)

# 1. What is here and what auto picks (eager and compiled).
run_stage env 60 10 bash -c "nvidia-smi; '$PYTHON' -m pip list 2>/dev/null | grep -iE '^(torch|triton|diffusers|transformers|peft|accelerate) '"
run_stage npu_kernels_report 60 10 "$PYTHON" -m npu_kernels

# 2. Tests on CUDA: every cuda-marked test, the Triton kernels natively, compile routing.
TEST_PATHS=$(ls -d tests/ops tests/test_triton_kernels.py 2> /dev/null | tr '\n' ' ')
# pytest's exit 5 (nothing selected, e.g. after H1's move of a file) is not a failure of the stage.
run_stage tests 180 60 bash -c "rc=0; ok() { \"\$@\"; r=\$?; [ \$r = 0 ] || [ \$r = 5 ] || rc=\$r; }; \
  ok '$PYTHON' -m pytest -q -rs -p no:cacheprovider tests -m cuda --junitxml='$OUT_DIR/tests_cuda.xml'; \
  ok '$PYTHON' -m pytest -q -rs -p no:cacheprovider $TEST_PATHS -m 'not slow' -k '$TEST_FILTER' --junitxml='$OUT_DIR/tests_triton.xml'; \
  ok '$PYTHON' -m pytest -q -rs -p no:cacheprovider tests/test_compile_routing.py --junitxml='$OUT_DIR/tests_compile_routing.xml'; \
  exit \$rc"

# 2b. Host time per eager call (Triton launches included), each op and swapped layer vs stock: ~30 s.
run_stage host_time 90 30 "${BENCH[@]}" benchmarks/test_bench_host_time.py -s --benchmark-json "$OUT_DIR/host_time.json"

# 3. The trainer end to end on the device: the embedded default (its first CUDA run).
run_stage trainer_embedded 120 45 "$PYTHON" -m trainer.sdxl_lora --output_dir "$OUT_DIR/trainer_embedded" \
  --max_train_steps "$EMBEDDED_STEPS" --checkpointing_steps 1000000 --seed 42

# 3b. The memory plan (trainer --memory_plan) vs torch.cuda.max_memory_allocated of the same step: the embedded
#     pipeline at 1024 px in four configurations, then SDXL's architecture at 1024 px bf16 (rehearsal: 128 px, CPU).
if [[ "$REHEARSAL" == 1 ]]; then
  run_stage memory_plan 120 40 "$PYTHON" -m benchmarks.memory_plan_accuracy --device cpu --resolution 128 --only "kernels on"
else
  run_stage memory_plan 300 120 bash -c "'$PYTHON' -m benchmarks.memory_plan_accuracy --device cuda --resolution 1024 --batch 2; r=\$?; \
    '$PYTHON' -m benchmarks.memory_plan_accuracy --device cuda --model sdxl --resolution 1024 --batch 1 || r=\$?; exit \$r"
fi

# 3c. The time-memory curve on SDXL's own UNet at 512 px, bf16: stock, checkpointing, every recompute level with and
#     without it (peak memory, saved bytes, 9 interleaved rounds), and the host-bound check in 3 processes
#     (rehearsal: the tiny UNet, one round).
if [[ "$REHEARSAL" == 1 ]]; then
  CURVE=(--size tiny --rounds 1 --host-rounds 1 --host-processes 1)
else
  CURVE=(--size sdxl --rounds 9 --host-rounds 9 --host-processes 3)
fi
run_stage memory_curve 240 120 "$PYTHON" -m benchmarks.memory_curve --precision bf16 "${CURVE[@]}" --out "$OUT_DIR/memory_curve"

# 4. UNet step at 512 px: eager/compiled x stock/optimized (bf16; fp32 is in the README already).
run_stage unet_step_512 240 150 "${BENCH[@]}" benchmarks/test_bench_unet_step.py "${UNET_512[@]}" -k bf16 \
  --compile-mode "$COMPILE_MODE" --benchmark-json "$OUT_DIR/unet_step_512.json"

# 5. The trainer on an SDXL-architecture pipeline (random weights) at 1024 px bf16: kernels off, on,
#    on + compile. Assets: ~14 GB built once (rehearsal: the embedded tiny pipeline at 64 px).
ASSETS_FILE="$OUT_DIR/sdxl_assets.txt"
if [[ "$REHEARSAL" == 1 ]]; then
  run_stage trainer_sdxl:assets 120 20 "$PYTHON" -c "from trainer.embedded_default import ensure_assets; a = ensure_assets(); open('$ASSETS_FILE', 'w').write(f'{a.model_dir}\n{a.dataset_dir}\n')"
  SDXL_RES=64
else
  run_stage trainer_sdxl:assets 300 150 "$PYTHON" -c "from benchmarks.sdxl_assets import ensure_sdxl_assets; m, d = ensure_sdxl_assets(); open('$ASSETS_FILE', 'w').write(f'{m}\n{d}\n')"
  SDXL_RES=1024
fi
if [[ -s "$ASSETS_FILE" ]]; then
  MODEL_DIR=$(sed -n 1p "$ASSETS_FILE"); DATASET_DIR=$(sed -n 2p "$ASSETS_FILE")
  SDXL_ARGS=(--pretrained_model_name_or_path "$MODEL_DIR" --dataset_name "$DATASET_DIR" --resolution "$SDXL_RES"
             --train_batch_size 1 --max_train_steps "$SDXL_STEPS" --mixed_precision bf16 --vae_name "$MODEL_DIR/vae"
             --center_crop --cache_latents --cache_text_embeddings --checkpointing_steps 1000000 --seed 42)
  run_stage trainer_sdxl:kernels_off 180 90 "$PYTHON" -m trainer.sdxl_lora "${SDXL_ARGS[@]}" --kernels off --output_dir "$OUT_DIR/trainer_sdxl_kernels_off"
  run_stage trainer_sdxl:kernels_on 180 90 "$PYTHON" -m trainer.sdxl_lora "${SDXL_ARGS[@]}" --kernels on --output_dir "$OUT_DIR/trainer_sdxl_kernels_on"
  if trainer_has_compile; then
    # (rehearsal: aot_eager, graph capture without inductor's C++ builds)
    TRAINER_COMPILE=(--compile --compile_mode "$COMPILE_MODE")
    [[ "$REHEARSAL" == 1 ]] && TRAINER_COMPILE+=(--compile_backend aot_eager)
    run_stage trainer_sdxl:kernels_on_compile 300 150 "$PYTHON" -m trainer.sdxl_lora "${SDXL_ARGS[@]}" --kernels on \
      "${TRAINER_COMPILE[@]}" --output_dir "$OUT_DIR/trainer_sdxl_kernels_on_compile"
  else
    RESULT[trainer_sdxl:kernels_on_compile]="SKIPPED (trainer has no --compile yet)"
  fi
fi

# 6. UNet step at 1024 px, the same four rows.
run_stage unet_step_1024 300 150 "${BENCH[@]}" benchmarks/test_bench_unet_step.py "${UNET_1024[@]}" -k bf16 \
  --compile-mode "$COMPILE_MODE" --benchmark-json "$OUT_DIR/unet_step_1024.json"

# 7. Host vs device time of the 512 px step, eager and compiled (the wall <= 1.25x GPU time target).
# (rehearsal: aot_eager, as the smoke benchmark: inductor's C++ builds take CPU minutes)
# and fp32, one implementation: bf16 steps crawl on a busy CPU)
if [[ "$REHEARSAL" == 1 ]]; then
  PROFILE=(--tiny --precision fp32 --impl npu_kernels --compile-backend aot_eager)
else
  PROFILE=(--resolution 512 --precision bf16 --impl npu_kernels --impl stock)
fi
run_stage profile_512 180 90 "$PYTHON" -m benchmarks.profile_unet_step "${PROFILE[@]}" --rows 8 --compile-mode "$COMPILE_MODE"

# 8. Custom op vs plain maths under compile, per op (feeds backends._COMPILED_ROUTES).
if [[ "$REHEARSAL" == 1 ]]; then ROUTING=(--op geglu --iterations 2); else ROUTING=(--iterations 20); fi
run_stage compiled_routing 150 60 "$PYTHON" -m benchmarks.compiled_routing --dtype bf16 "${ROUTING[@]}" \
  --json "$OUT_DIR/compiled_routing.json"

# 9. The kernel table (Triton vs eager vs torch.compile at SDXL shapes; skips itself without CUDA).
# (pytest's exit 5 = the module skipped itself: no CUDA, as in the rehearsal)
run_stage kernel_table 240 120 bash -c "'$PYTHON' -m pytest -q -p no:cacheprovider --benchmark-only benchmarks/test_bench_triton_gpu.py \
  --benchmark-json '$OUT_DIR/kernel_table.json'; r=\$?; [ \$r = 5 ] && exit 0; [ \$r = 0 ] || exit \$r; \
  [ ! -s '$OUT_DIR/kernel_table.json' ] || '$PYTHON' -m benchmarks.to_table '$OUT_DIR/kernel_table.json'"

# ------------------------------------------------------------------------------------------- summary
say "summary (logs and JSON in $OUT_DIR):"
failed=0 skipped=()
for name in env npu_kernels_report tests host_time trainer_embedded memory_plan memory_curve unet_step_512 trainer_sdxl:assets trainer_sdxl:kernels_off \
            trainer_sdxl:kernels_on trainer_sdxl:kernels_on_compile unet_step_1024 profile_512 compiled_routing kernel_table; do
  status="${RESULT[$name]:-not run}"
  say "  $(printf '%-34s' "$name") $status"
  case "$status" in FAILED*|TIMEOUT*) failed=1 ;; SKIPPED\ \(budget*) skipped+=("${name%%:*}") ;; esac
done
"$PYTHON" - "$OUT_DIR" 2>&1 <<'EOF' | tee -a "$SUMMARY" || true
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("unet_step_*.json")):
    for b in json.loads(path.read_text()).get("benchmarks", []):
        e = b["extra_info"]
        print(f"  {path.stem:<15} {e.get('precision')} {str(e.get('mode')):<8} {str(e.get('impl')):<11} step {(e.get('step_s') or 0) * 1e3:8.1f} ms"
              f"  compile {e.get('compile_s') or 0:6.1f} s  x{e.get('speedup_vs_stock_eager') or 0:.2f} vs stock eager")
for path in sorted(out.glob("host_time.json")):
    for b in json.loads(path.read_text()).get("benchmarks", []):
        e = b["extra_info"]
        if e.get("impl") != "stock" and e.get("ratio_vs_stock"):
            print(f"  host_time       {e['layer']:<16} {e['mode']:<9} {e['host_us_per_call']:7.1f} us/call  x{e['ratio_vs_stock']:.2f} vs stock")
for path in sorted(out.glob("trainer_*/summary.json")):
    s = json.loads(path.read_text())
    print(f"  {path.parent.name:<34} images/s {s.get('fps')}  compile_s {s.get('compile_seconds')}  mean loss {s.get('mean_train_loss')}"
          f"  device {s.get('device')}  backends {s.get('backends')}")
EOF
if (( ${#skipped[@]} )); then
  say "not run for lack of time; next run: GPU_CHECK_STAGES=\"$(printf '%s ' "${skipped[@]}" | xargs -n1 | sort -u | xargs)\" benchmarks/gpu_check.sh"
fi
exit $failed
