#!/usr/bin/env bash
# The one script for the GPU machine, run from the repository root:
#
#     bash benchmarks/run_gpu.sh                  # every step
#     STEPS="env bench plot" bash benchmarks/run_gpu.sh
#
# Steps (each one runs even when an earlier one failed; every exit code is recorded):
#   env    nvidia-smi, versions, `moe-ops info`
#   te     install Transformer Engine from .te/ + .te-parts/ (../shared/tools/te-gpu/prepare.sh) when they are
#          there and it is not installed yet (about 2 minutes)
#   tests  python -m pytest -q -x on tests/gpu and tests/*_gpu.py (test_te_gpu.py only when TE imports)
#   check  moe-ops check --device cuda --dtype bfloat16 (every module x activation x bias against float64)
#   bench  benchmarks/bench_experts.py, every shape x routing x path
#   host   benchmarks/bench_host.py --profile: host time per call, eager / compiled / reduce-overhead / CUDA graph
#          against the torch reference path (HOST_ARGS adds arguments, e.g. "--tokens 1,512")
#   lora   benchmarks/bench_experts.py --lora 16,64 at qwen3 and gptoss20b (uniform): the frozen-base block, ours and
#          NeMo's GroupedExpertsLoRA (torch_mm) per rank, fwd+bwd time and memory (JSON: $OUT/bench_lora.json)
#   decode benchmarks/bench_decode.py: decode-sized forwards (T 1..512) against the floor (touched experts' bytes over
#          the measured copy rate): eager, CUDA graph, torch.export, torch_ref (DECODE_ARGS adds e.g. "--aoti"),
#          chart $OUT/bench_decode.png
#   hf     benchmarks/bench_hf.py: a transformers Qwen3-MoE-shaped model, experts_implementation "moe_ops" against
#          "grouped_mm" (training step, generate tokens/s; HF_ARGS adds arguments, e.g. "--layers 2")
#   ep     expert parallelism, for each world size N in EP_SIZES (default "2"; the machine needs N GPUs):
#          torchrun benchmarks/gpu_ep_parity.py --compile-backend inductor, then benchmarks/bench_ep.py --host-costs
#          (EP_BENCH_ARGS replaces --host-costs, e.g. "--host-costs --profile")
#   plot   benchmarks/plot.py on the JSON (skipped with a note when matplotlib is missing: run it later on
#          any machine with `python benchmarks/plot.py path/to/bench_experts.json`)
# Logs: $OUT/<step>.log, the JSON and the PNG in $OUT, exit codes in $OUT/steps.txt. At most 8 files come back
# from the device machine: when there are more, the end of the script packs all but steps.txt into
# $OUT/results.tgz (`tar xzf` it here). Everything stops by TOTAL_S seconds (default 530).
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# NeMo AutoModel (bench_experts' "nemo" baseline): its pure-Python wheel unpacked into .nemo/ (git-ignored;
# `pip download --no-deps nemo-automodel==0.7.0` and unzip it there), carried to the GPU machine.
[[ -d .nemo/nemo_automodel ]] && export PYTHONPATH="$PYTHONPATH:$PWD/.nemo"
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
export OUT
STEPS=${STEPS:-"env te tests bench host plot"}  # add "ep" (and EP_SIZES) on a machine with several GPUs
TOTAL_S=${TOTAL_S:-530}
START=$SECONDS
PY=${PYTHON:-python}
: > "$OUT/steps.txt"

left() { echo $(( TOTAL_S - (SECONDS - START) )); }

# run_step NAME CAP_SECONDS: banner, run step_NAME under timeout min(cap, time left), tee to $OUT/NAME.log,
# record its exit code. Steps run in a child bash (timeout cannot run a shell function itself).
run_step() {
  local name=$1 cap=$2
  local limit; limit=$(left); (( cap < limit )) && limit=$cap
  local log="$OUT/$name.log"
  printf '\n========== %s (limit %ss, %ss elapsed) ==========\n' "$name" "$limit" "$((SECONDS - START))" | tee -a "$log"
  if (( limit < 5 )); then
    echo "skipped: time budget spent" | tee -a "$log"; echo "$name skipped (time budget spent)" >> "$OUT/steps.txt"; return
  fi
  local t0=$SECONDS
  STEP_LIMIT=$limit timeout --signal=INT --kill-after=15 "$limit" bash -c "step_$name" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]} note=""
  (( rc == 124 )) && note=" (timed out)"
  echo "$name rc=$rc$note $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
}

want() { [[ " $STEPS " == *" $1 "* ]]; }

step_env() {
  nvidia-smi || echo "nvidia-smi failed"
  $PY - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "transformer_engine", "matplotlib"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "n/a:", type(e).__name__, e)
EOF
  moe-ops info || $PY -m moe_modules.cli info || echo "moe-ops info failed"
}

step_te() {
  if $PY -c 'import transformer_engine.pytorch' 2>/dev/null; then echo "transformer_engine already importable"; return 0; fi
  if [[ ! -f .te/install.sh ]]; then echo "no .te/ here: Transformer Engine stays uninstalled (TE rows will say n/a)"; return 0; fi
  mkdir -p /tmp/te && cp .te/* /tmp/te/ && { cp .te-parts/part_* /tmp/te/ 2>/dev/null || true; }
  ls -la /tmp/te
  (cd /tmp/te && bash ./install.sh)
}

step_tests() {
  local files=()
  [[ -d tests/gpu ]] && files+=(tests/gpu)
  for f in tests/*_gpu.py; do
    [[ -e $f ]] || continue
    if [[ $f == tests/test_te_gpu.py ]] && ! $PY -c 'import transformer_engine.pytorch' 2>/dev/null; then
      echo "skipping $f: transformer_engine does not import"; continue
    fi
    files+=("$f")
  done
  if (( ${#files[@]} == 0 )); then echo "no GPU test files found"; return 0; fi
  echo "pytest on: ${files[*]}"
  $PY -m pytest -q -x -p no:cacheprovider "${files[@]}"
}

step_check() {
  $PY -m moe_modules.cli check --device cuda --dtype bfloat16
}

step_bench() {
  # Timed paths get the step's limit less 60 s, kept for start-up, the checks and the table.
  local budget=$(( STEP_LIMIT - 60 )); (( budget > 300 )) && budget=300; (( budget < 30 )) && budget=30
  $PY benchmarks/bench_experts.py --time-budget "$budget" ${BENCH_ARGS:-}
}

step_lora() {
  $PY benchmarks/bench_experts.py --shapes qwen3,gptoss20b --routing uniform --lora 16,64 --skip-baselines \
    --paths ours --no-checks --time-budget $(( STEP_LIMIT - 60 )) --json "$OUT/bench_lora.json" ${LORA_ARGS:-}
}

step_decode() {
  $PY benchmarks/bench_decode.py --plot "$OUT/bench_decode.png" ${DECODE_ARGS:-}
}

step_host() {
  $PY benchmarks/bench_host.py --profile ${HOST_ARGS:-}
}

step_hf() {
  $PY benchmarks/bench_hf.py ${HF_ARGS:-}
}

step_ep() {
  local rc=0 n
  for n in ${EP_SIZES:-2}; do
    echo "---- EP x$n: parity (eager and inductor) ----"
    torchrun --nproc-per-node "$n" benchmarks/gpu_ep_parity.py --compile-backend inductor || rc=1
    echo "---- EP x$n: dispatch+combine and layer benchmark ----"
    torchrun --nproc-per-node "$n" benchmarks/bench_ep.py ${EP_BENCH_ARGS:---host-costs} || rc=1
  done
  return $rc
}

step_plot() {
  [[ -f $OUT/bench_experts.json ]] || { echo "no $OUT/bench_experts.json to plot"; return 1; }
  if ! $PY -c 'import matplotlib' 2>/dev/null; then
    echo "matplotlib missing here: later, on the CPU machine: python benchmarks/plot.py <fetched>/bench_experts.json"
    return 0
  fi
  $PY benchmarks/plot.py "$OUT/bench_experts.json" --out "$OUT/bench_experts.png"
}

export PY OUT
export -f step_env step_te step_tests step_check step_bench step_lora step_decode step_host step_hf step_ep step_plot

want env   && run_step env 60
want te    && run_step te 200
want ep    && run_step ep "${EP_CAP_S:-400}"
want tests && run_step tests 150
want check && run_step check 90
want bench && run_step bench 420
want lora  && run_step lora "${LORA_CAP_S:-300}"
want decode && run_step decode "${DECODE_CAP_S:-400}"
want host  && run_step host "${HOST_CAP_S:-400}"
want hf    && run_step hf "${HF_CAP_S:-300}"
want plot  && run_step plot 60

echo
echo "========== summary ($((SECONDS - START))s) =========="
cat "$OUT/steps.txt"
tail -n 150 "$OUT/bench.log" 2>/dev/null | sed -n '/^card:/,$p'
# The device machine returns at most 8 files: pack the rest when there are more.
if (( $(find "$OUT" -type f | wc -l) > 8 )); then
  (cd "$OUT" && find . -type f ! -name steps.txt ! -name results.tgz -print0 | tar czf results.tgz --null -T - \
    --remove-files) && echo "packed $OUT/results.tgz (tar xzf it on this side)"
fi
