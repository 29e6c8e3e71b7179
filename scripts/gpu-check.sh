#!/usr/bin/env bash
# GPU check: does the toolkit run on this machine's GPU, agree with the CPU, and how fast.
#
# Run from the unpacked GPU bundle (scripts/gpu-bundle.sh) inside a copy of the repository,
# whose fixtures/ it reads:
#
#   cd REPO && tar xf diep-gpu.tar.xz && diep-gpu/gpu-check.sh [--out DIR]
#
# or from a checkout with binaries built here: scripts/gpu-check.sh --bin target/release.
# Steps (each under `timeout`):
#   detect        nvidia-smi, `xtask device --device cuda` and `--device wgpu` (name, and
#                 whether the wgpu adapter is a physical card or a software rasterizer)
#   eval-parity   every fixtures/parity/<name>/ids.json with fixtures/models/<name>:
#                 `xtask eval --json` on cuda vs cpu, perplexities within 1e-4 relative
#   prune-diep    `prune --method diep` on fixtures/trained-moe, cuda vs cpu: same kept experts
#   perf-<dev>    on a generated 4-layer checkpoint: forward tok/s (eval) and seconds per DiEP
#                 step (xtask bench-step), on cuda and on wgpu
#   memory        peak GPU memory over the run (nvidia-smi polled in the background)
# A step whose device is missing is reported "not run: <reason>". Writes DIR/gpu-check.json and
# DIR/gpu-check.md (DIR: --out, default gpu-check-out). Exit status: 1 if a step that ran
# failed, else 0 (also when nothing could run).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=""
out="gpu-check-out"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$bin" ]; then
  if [ -x "$here/bin/xtask" ]; then bin="$here/bin"; else bin="$here/../target/release"; fi
fi
XTASK="$bin/xtask"
# Shared libraries shipped in the bundle (those a bare host may lack).
if [ -d "$here/lib" ]; then export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
[ -x "$XTASK" ] || { echo "gpu-check: no xtask binary at $XTASK (use --bin DIR)" >&2; exit 2; }
[ -d fixtures/parity ] || { echo "gpu-check: run it from the repository root (no fixtures/parity here)" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$out/work"
rm -rf "$work" && mkdir -p "$work"

T_DETECT=${GPU_CHECK_T_DETECT:-120}
T_EVAL=${GPU_CHECK_T_EVAL:-300}
T_PRUNE=${GPU_CHECK_T_PRUNE:-900}
T_GEN=${GPU_CHECK_T_GEN:-600}
T_PERF=${GPU_CHECK_T_PERF:-900}

names=() statuses=() details=()
failed=0
record() { # name status detail
  names+=("$1"); statuses+=("$2"); details+=("$3")
  [ "$2" = fail ] && failed=1
  if [ "$2" = "not run" ]; then printf '%-28s not run: %s\n' "$1" "$3"; else printf '%-28s %s: %s\n' "$1" "$2" "$3"; fi
}
# Last line of a file (an error message), on one line.
last_line() { grep -v '^\s*$' "$1" 2>/dev/null | tail -n 1 | tr -d '\r' | cut -c1-400; }
# Runs a command under timeout; its stdout to $1, stderr to $1.err. Returns its status.
run_to() {
  local dest=$1 t=$2; shift 2
  timeout "$t" "$@" >"$dest" 2>"$dest.err"
}
json_num() { # file key -> the first number after "key":
  tr -d '\n' <"$1" | grep -o "\"$2\": *[-0-9.eE+]*" | head -n1 | sed 's/.*: *//'
}

# --- detect ---------------------------------------------------------------------------
gpu_name=""
if command -v nvidia-smi >/dev/null; then
  if gpu_name=$(timeout "$T_DETECT" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1); then
    record "detect/nvidia-smi" ok "$(echo "$gpu_name" | paste -sd ';')"
  else
    record "detect/nvidia-smi" "not run" "nvidia-smi failed: $(echo "$gpu_name" | tail -n1)"
    gpu_name=""
  fi
else
  record "detect/nvidia-smi" "not run" "nvidia-smi not found"
fi

# Why `xtask device --device $1` failed: its last error line, or that it failed or timed out.
device_failure() {
  local why
  why=$(last_line "$work/device-$1.err")
  why=${why#error: }
  echo "${why:-xtask device --device $1 failed or timed out}"
}

cuda_ok=0
if run_to "$work/device-cuda" "$T_DETECT" "$XTASK" device --device cuda; then
  cuda_ok=1
  record "detect/cuda" ok "$(cat "$work/device-cuda")"
else
  record "detect/cuda" "not run" "$(device_failure cuda)"
fi

wgpu_ok=0
if run_to "$work/device-wgpu" "$T_DETECT" "$XTASK" device --device wgpu; then
  if grep -q '"physical": *false' "$work/device-wgpu" || grep -q '"physical":false' "$work/device-wgpu"; then
    adapter=$(tr -d '\n' <"$work/device-wgpu" | grep -o '"name": *"[^"]*"' | sed 's/.*: *//')
    record "detect/wgpu" "not run" "the wgpu adapter ${adapter:-(unnamed)} is not a GPU (a software rasterizer or a CPU)"
  else
    wgpu_ok=1
    record "detect/wgpu" ok "$(cat "$work/device-wgpu")"
  fi
else
  record "detect/wgpu" "not run" "$(device_failure wgpu)"
fi

# --- peak memory monitor ----------------------------------------------------------------
mem_pid=""
if [ -n "$gpu_name" ] && [ "$cuda_ok$wgpu_ok" != "00" ]; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$work/mem.log" 2>/dev/null &
  mem_pid=$!
fi

# --- eval parity: cuda vs cpu -------------------------------------------------------------
for ids in fixtures/parity/*/ids.json; do
  name=$(basename "$(dirname "$ids")")
  model="fixtures/models/$name"
  [ -d "$model" ] || continue
  step="eval-parity/$name"
  if [ "$cuda_ok" != 1 ]; then record "$step" "not run" "no CUDA device (detect/cuda)"; continue; fi
  ok=1
  for dev in cpu cuda; do
    if ! run_to "$work/eval-$name-$dev.log" "$T_EVAL" "$XTASK" eval --device "$dev" --model "$model" --ids "$ids" --json "$work/eval-$name-$dev.json"; then
      record "$step" fail "eval on $dev: $(last_line "$work/eval-$name-$dev.log.err")"; ok=0; break
    fi
  done
  [ "$ok" = 1 ] || continue
  a=$(json_num "$work/eval-$name-cpu.json" ids.json) b=$(json_num "$work/eval-$name-cuda.json" ids.json)
  if awk -v a="$a" -v b="$b" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a > 0 && d / a <= 1e-4) }'; then
    record "$step" ok "perplexity cpu $a, cuda $b"
  else
    record "$step" fail "perplexity cpu $a, cuda $b (more than 1e-4 relative apart)"
  fi
done

# --- prune --method diep: cuda vs cpu -------------------------------------------------------
step="prune-diep/trained-moe"
if [ "$cuda_ok" != 1 ]; then
  record "$step" "not run" "no CUDA device (detect/cuda)"
else
  ok=1
  for dev in cpu cuda; do
    if ! run_to "$work/prune-$dev.log" "$T_PRUNE" "$XTASK" prune --device "$dev" --model fixtures/trained-moe \
      --method diep --ratio 0.5 --calib fixtures/trained-moe/calib.txt --samples 8 --seq-len 128 --epochs 2 \
      --out "$work/pruned-$dev" --force; then
      record "$step" fail "prune on $dev: $(last_line "$work/prune-$dev.log.err")"; ok=0; break
    fi
  done
  if [ "$ok" = 1 ]; then
    kept() { tr -d ' \n\t' <"$1/pruning.json" | grep -o '"kept_experts":\[\(\[[0-9,]*\],\?\)*\]'; }
    if [ -n "$(kept "$work/pruned-cpu")" ] && [ "$(kept "$work/pruned-cpu")" = "$(kept "$work/pruned-cuda")" ]; then
      record "$step" ok "same kept experts on cpu and cuda"
    else
      record "$step" fail "kept experts differ: cpu $(kept "$work/pruned-cpu") vs cuda $(kept "$work/pruned-cuda")"
    fi
  fi
fi

# --- performance on a generated checkpoint ----------------------------------------------------
gen="$work/generated"
gen_ok=0
if [ "$cuda_ok$wgpu_ok" != "00" ]; then
  if run_to "$work/generate.log" "$T_GEN" "$XTASK" fixture generate --out "$gen" --layers 4 --force; then
    gen_ok=1
    # 8 sequences of 256 token ids below 2048 (the generated tokenizer's range).
    awk 'BEGIN { srand(7); printf "["; for (s = 0; s < 8; s++) { printf "%s[", (s ? "," : "");
         for (t = 0; t < 256; t++) printf "%s%d", (t ? "," : ""), int(rand() * 2048); printf "]" } print "]" }' >"$work/perf-ids.json"
  else
    record "perf/generate" fail "fixture generate: $(last_line "$work/generate.log.err")"
  fi
fi
for dev in cuda wgpu; do
  if [ "$dev" = cuda ]; then dok=$cuda_ok why="no CUDA device (detect/cuda)"; else dok=$wgpu_ok why="no wgpu GPU (detect/wgpu)"; fi
  if [ "$dok" != 1 ]; then
    record "perf-$dev/forward" "not run" "$why"; record "perf-$dev/diep-step" "not run" "$why"; continue
  fi
  [ "$gen_ok" = 1 ] || { record "perf-$dev/forward" "not run" "no generated checkpoint"; record "perf-$dev/diep-step" "not run" "no generated checkpoint"; continue; }
  if run_to "$work/perf-$dev.log" "$T_PERF" "$XTASK" eval --device "$dev" --model "$gen" --ids "$work/perf-ids.json" --json "$work/perf-$dev.json"; then
    record "perf-$dev/forward" ok "$(json_num "$work/perf-$dev.json" tokens_per_second) tok/s (8 x 256 tokens)"
  else
    record "perf-$dev/forward" fail "$(last_line "$work/perf-$dev.log.err")"
  fi
  if run_to "$work/step-$dev.log" "$T_PERF" "$XTASK" bench-step --device "$dev" --model "$gen" \
    --ids "$work/perf-ids.json" --batch 8 --reps 3 --reference-top-k 64; then
    record "perf-$dev/diep-step" ok "$(json_num "$work/step-$dev.log" seconds_per_step) s per step (batch 8 x 256)"
  else
    record "perf-$dev/diep-step" fail "$(last_line "$work/step-$dev.log.err")"
  fi
done

# --- peak memory ---------------------------------------------------------------------------------
if [ -n "$mem_pid" ]; then
  kill "$mem_pid" 2>/dev/null; wait "$mem_pid" 2>/dev/null
  peak=$(sort -n "$work/mem.log" | tail -n1)
  record "memory/peak" ok "${peak:-?} MiB used at peak (all processes, polled every 200 ms)"
else
  record "memory/peak" "not run" "$([ -z "$gpu_name" ] && echo "nvidia-smi not available" || echo "no GPU step ran")"
fi

# --- reports -------------------------------------------------------------------------------------
esc() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g; s/\t/ /g' | tr -d '\n\r'; }
{
  printf '{\n  "date": "%s",\n  "host": "%s",\n  "xtask": "%s",\n  "failed": %s,\n  "steps": [\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(esc "$(uname -srm)")" "$(esc "$XTASK")" "$([ $failed = 1 ] && echo true || echo false)"
  for i in "${!names[@]}"; do
    printf '    {"step": "%s", "status": "%s", "detail": "%s"}%s\n' "$(esc "${names[$i]}")" "${statuses[$i]}" \
      "$(esc "${details[$i]}")" "$([ $((i + 1)) -lt ${#names[@]} ] && echo ,)"
  done
  printf '  ]\n}\n'
} >"$out/gpu-check.json"
{
  echo "# GPU check"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -srm), \`$XTASK\`."
  echo
  echo "| step | result |"
  echo "|---|---|"
  for i in "${!names[@]}"; do
    if [ "${statuses[$i]}" = "not run" ]; then r="not run: ${details[$i]}"; else r="${statuses[$i]}: ${details[$i]}"; fi
    echo "| ${names[$i]} | $(printf '%s' "$r" | sed 's/|/\\|/g') |"
  done
} >"$out/gpu-check.md"
echo "gpu-check: wrote $out/gpu-check.json and $out/gpu-check.md"
exit "$failed"
