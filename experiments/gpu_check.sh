#!/usr/bin/env bash
# Every GPU number the project asks for, in one command on a machine with one H100/H200 (no
# network needed), in under 10 minutes:
#
#   bash experiments/gpu_check.sh [--reference-dir DIR] [--out-dir DIR] [--budget SECONDS]
#   bash experiments/gpu_check.sh --cpu-smoke [--reference-dir DIR]   # tiny, on CPU: checks the script
#
# Stages (each in its own process, with its own time limit, so one failure loses nothing else;
# each writes its JSON under --out-dir with a `gpu_` prefix, `cpusmoke_` with --cpu-smoke):
#   attention        experiments/bench_attention.py: kernel fwd / fwd+bwd TFLOP/s vs cuDNN and dense XLA
#   train_var_d16    experiments/bench_sharding.py: VAR-d16 training step, bf16, img/s and MFU
#   sampling_var_d16 experiments/bench_sampling.py --preset gpu: VAR-d16 sampling img/s (bf16)
#   sampling_llamagen_l  bench_sampling.py --preset gpu_raster: LlamaGen-L img/s and tokens/s
# With --reference-dir DIR (DIR/VAR, DIR/LlamaGen, DIR/mar: official checkouts):
#   official_train   experiments/bench_train.py --reference DIR: our step vs the official one
#   official_sampling_var  bench_sampling.py --preset gpu --reference DIR/VAR
# and a summary, <prefix>check.json: the device, versions, and per stage its exit status, seconds,
# limit, JSON and the tail of its log. A stage's limit is cut to what is left of --budget
# (default 570 s; with --cpu-smoke 3600 s and 5x the stage limits), so the whole script ends in
# time; a stage with under 20 s left is skipped.
#
# Offline machine: wheels in .whl/ (repo root) are installed into /tmp/site first and put on
# PYTHONPATH. PYTHON selects the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SMOKE=0
REF=""
OUT=""
BUDGET=570
BUDGET_SET=0
LIMIT_SCALE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --reference-dir) REF=$2; shift ;;
    --reference-dir=*) REF=${1#*=} ;;
    --out-dir) OUT=$2; shift ;;
    --out-dir=*) OUT=${1#*=} ;;
    --budget) BUDGET=$2; BUDGET_SET=1; shift ;;
    --budget=*) BUDGET=${1#*=}; BUDGET_SET=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$REF" ] && [ ! -d "$REF" ]; then
  echo "gpu_check.sh: --reference-dir $REF is not a directory" >&2; exit 2
fi

PY=${PYTHON:-python3}
if [ "$SMOKE" = 1 ]; then
  PREFIX=cpusmoke_
  OUT=${OUT:-$(mktemp -d -t gpu_check_smoke.XXXXXX)}  # never over the committed results
  export JAX_PLATFORMS=cpu
  # A busy 2-core machine needs minutes per stage; the smoke checks the script, not the time.
  [ "$BUDGET_SET" = 1 ] || BUDGET=3600
  LIMIT_SCALE=5
else
  PREFIX=gpu_
  OUT=${OUT:-experiments/results}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d -t gpu_check_logs.XXXXXX)
START=$(date +%s)
STAGES="$LOGS/stages.tsv"
: > "$STAGES"

export PYTHONUNBUFFERED=1
if [ "$SMOKE" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
  echo "== installing .whl/ into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || echo "(wheel install failed; continuing)"
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

# stage NAME LIMIT_S JSON CMD...: runs CMD under `timeout`, cut to the budget left; records it.
stage() {
  local name=$1 limit=$(( $2 * LIMIT_SCALE )) json=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped (${left}s of the budget left)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$limit" "$json" >> "$STAGES"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 15 "$LOGS/$name.log"
  echo "== $name: exit $rc after ${dt}s$([ "$rc" = 124 ] && echo ' (time limit)')"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$limit" "$json" >> "$STAGES"
}

J() { echo "$OUT/${PREFIX}$1.json"; }

if [ "$SMOKE" = 1 ]; then
  stage attention 120 "$(J attention)" \
    $PY experiments/bench_attention.py --quick --iters 1 --out "$(J attention)"
  stage train_var_d16 120 "$(J train_var_d16)" \
    $PY experiments/bench_sharding.py --config configs/var.py:smoke --strategies dp --steps 1 \
      --warmup 1 --set model.dtype=bfloat16 --out "$(J train_var_d16)"
  stage sampling_var_d16 120 "$(J sampling_var_d16)" \
    $PY experiments/bench_sampling.py --quick --impls kv_cache --cfg 1.5 --runs 1 \
      --dtype bfloat16 --out "$(J sampling_var_d16)"
  stage sampling_llamagen_l 120 "$(J sampling_llamagen_l)" \
    $PY experiments/bench_sampling.py --config configs/raster.py:smoke --batch 1 --cfg 2.0 \
      --runs 1 --dtype bfloat16 --out "$(J sampling_llamagen_l)"
  if [ -n "$REF" ]; then
    stage official_train 240 "$(J official_train)" \
      $PY experiments/bench_train.py --reference "$REF" --cases var_fmnist --rounds 1 --steps 1 \
        --out "$(J official_train)"
    stage official_sampling_var 120 "$(J official_sampling_var)" \
      $PY experiments/bench_sampling.py --quick --impls kv_cache --cfg 1.5 --runs 1 \
        --reference "$REF/VAR" --out "$(J official_sampling_var)"
  fi
else
  stage attention 100 "$(J attention)" \
    $PY experiments/bench_attention.py --iters 20 --out "$(J attention)"
  stage train_var_d16 110 "$(J train_var_d16)" \
    $PY experiments/bench_sharding.py --config configs/var.py:d16 --strategies dp --batch 64 \
      --steps 10 --warmup 2 --set model.dtype=bfloat16 --out "$(J train_var_d16)"
  stage sampling_var_d16 80 "$(J sampling_var_d16)" \
    $PY experiments/bench_sampling.py --preset gpu --impls kv_cache --out "$(J sampling_var_d16)"
  stage sampling_llamagen_l 80 "$(J sampling_llamagen_l)" \
    $PY experiments/bench_sampling.py --preset gpu_raster --out "$(J sampling_llamagen_l)"
  if [ -n "$REF" ]; then
    # JAX and torch share the GPU in one process here: JAX takes memory as it needs it.
    XLA_PYTHON_CLIENT_PREALLOCATE=false stage official_train 120 "$(J official_train)" \
      $PY experiments/bench_train.py --reference "$REF" --rounds 3 --steps 5 \
        --out "$(J official_train)"
    XLA_PYTHON_CLIENT_PREALLOCATE=false stage official_sampling_var 80 "$(J official_sampling_var)" \
      $PY experiments/bench_sampling.py --preset gpu --impls kv_cache --reference "$REF/VAR" \
        --out "$(J official_sampling_var)"
  fi
fi

# The summary: device, versions, and every stage (status, time, limit, JSON, log tail).
$PY - "$STAGES" "$LOGS" "$(J check)" "$SMOKE" "$REF" <<'EOF'
import json, os, platform, subprocess, sys, time

stages_tsv, logs, out, smoke, ref = sys.argv[1:6]
def sh(cmd):
  try:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
versions = {}
for mod in ("jax", "jaxlib", "flax", "optax", "torch"):
  try:
    versions[mod] = __import__(mod).__version__
  except Exception:  # noqa: BLE001 -- absent: not recorded
    pass
rows = []
for line in open(stages_tsv):
  name, rc, seconds, limit, path = line.rstrip("\n").split("\t")
  log = os.path.join(logs, name + ".log")
  tail = open(log, errors="replace").read()[-2000:] if os.path.exists(log) else ""
  ok = rc == "0" and os.path.exists(path)
  rows.append(dict(stage=name, status="ok" if ok else ("skipped" if rc == "skipped" else "failed"),
                   exit=rc, seconds=int(seconds), limit_s=int(limit),
                   json=os.path.basename(path) if os.path.exists(path) else None, log_tail=tail))
result = dict(
  when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  smoke=smoke == "1",
  reference=bool(ref),
  command="bash experiments/gpu_check.sh" + (" --cpu-smoke" if smoke == "1" else "")
  + (" --reference-dir <official checkouts>" if ref else ""),
  gpu=sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]),
  host=dict(machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version()),
  versions=versions,
  stages=rows,
)
with open(out, "w") as f:
  json.dump(result, f, indent=1)
print(f"{'stage':<24} {'status':<8} {'s':>5} {'limit':>6}  json")
for r in rows:
  print(f"{r['stage']:<24} {r['status']:<8} {r['seconds']:>5} {r['limit_s']:>6}  {r['json']}")
print(f"wrote {out}")
sys.exit(0 if all(r["status"] == "ok" for r in rows) else 1)
EOF
rc=$?
echo "== total $(( $(date +%s) - START ))s; results in $OUT; logs in $LOGS"
exit $rc
