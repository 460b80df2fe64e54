#!/usr/bin/env bash
# The GPU benchmark run of issue 6, in one go on one GPU, within a time budget (default 8 min):
#   1. this project's ResNet-50 train step, bf16, batch 256, and at the largest batch that fits;
#   2. PyTorch on the same GPU: torchvision resnet50, torch.compile, channels-last, bf16 autocast,
#      SGD, batch 256;
#   3. ResNet-18 and ResNet-101 training, ResNet-50 inference;
#   4. XLA flags from the JAX GPU performance tips (latency-hiding scheduler, Triton GEMM off / on
#      for any GEMM, autotune level 0), and ghost (per-device) BN vs the default global BN;
#   5. the training loop's overhead over the bare step (bench.loop_overhead), if time is left.
# And, third in priority (after 1-2): end to end, ResNet-50 bf16 training through the real
# trainer (train.train_and_evaluate) on JPEG files generated on the machine, through the
# TensorFlow-free grain loader (worker processes on every core, the best decoder installed),
# from the JPEGs and from a prepared store (longest side 256), beside the same trainer on
# synthetic data: images/s and input_wait_fraction of each (bench.input_bound); the target is
# >= 8,000 img/s per H200.
# Items run in that order of priority, each in its own process; an item that would not finish
# inside the budget is skipped and says so. ONLY='name1 name2' runs just the items whose names
# start with one of those (the rest are recorded as skipped). Results: $OUT/gpu_results.json
# (every item's numbers and the ratios), $OUT/gpu_results.txt (the table, also printed last),
# $OUT/gpu_log.txt (stderr).
#
#   bash bench/gpu.sh                     # OUT defaults to ./bench_out
#   SMOKE=1 bash bench/gpu.sh             # the same plan on a tiny model, on CPU: checks the script
#
# The machine must already have JAX (with CUDA), Flax, optax, orbax-checkpoint, PyTorch,
# torchvision, NumPy, absl-py and etils; this script never installs or upgrades them. The rest
# (ml-collections, tqdm, tensorboardX, grain and its requirements, simplejpeg) comes, without
# network, from wheels in bench/.whl/ (git-ignored; fill it with `python -m bench.gpu_wheels
# download` on a machine with a package index, 64 MiB at most): those that fit this Python and
# whose distribution is not installed go into $SITE (default /tmp/site, put on PYTHONPATH),
# with pip, or unpacked with the standard library where there is no pip (UNPACK_WHEELS=1 forces
# that). If torch.compile fails the PyTorch item runs eager; if torchvision fails, on the
# script's own torch.nn ResNet (the item's JSON says which: torch_path). SMOKE=1 forces
# torch.compile with an unknown backend, so the eager fallback runs there. Environment knobs:
# BUDGET_S, BATCH, PEAK_TFLOPS (per-GPU bf16 peak for MFU; default 790, the measured H200 bf16
# matmul rate), E2E_IMAGES, ONLY, PYTHON, OUT, SITE.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/bench_out}
BUDGET_S=${BUDGET_S:-470}
BATCH=${BATCH:-256}
PEAK_TFLOPS=${PEAK_TFLOPS:-790}
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
START=$(date +%s)
mkdir -p "$OUT"
RESULTS="$OUT/gpu_results.jsonl"
LOG="$OUT/gpu_log.txt"
: > "$RESULTS"
: > "$LOG"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=2
CACHE=${CACHE:-/tmp/resnet_flax_jax_cache}

log() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }

# Cores this script may use: the affinity mask (nproc), capped by a cgroup CPU quota, which a
# container may set without narrowing the mask.
cores() {
  local n quota period
  n=$(nproc)
  if read -r quota period 2>/dev/null < /sys/fs/cgroup/cpu.max && [ "$quota" != max ]; then
    (( (quota + period - 1) / period < n )) && n=$(( (quota + period - 1) / period ))
  fi
  echo "$n"
}
CORES=$(cores)

# ---- Missing pure-Python dependencies, from wheels carried beside the script.
SITE=${SITE:-/tmp/site}
site=$("$PY" -m bench.gpu_wheels install --target "$SITE" ${UNPACK_WHEELS:+--unpack} \
       2> >(tee -a "$LOG" >&2)) || { log 'wheel install failed'; exit 1; }
[ -n "$site" ] && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c 'import absl, etils.epath, flax, jax, ml_collections, optax, orbax.checkpoint' \
    >> "$LOG" 2>&1; then
  log "missing packages (see $LOG): carry their wheels in bench/.whl/ (python -m bench.gpu_wheels)"
  exit 1
fi
for module in tqdm tensorboardX grain torch; do
  "$PY" -c "import $module" >> "$LOG" 2>&1 || log "warning: no $module: the items needing it fail"
done
"$PY" - >> "$LOG" 2>&1 <<'EOF'
import jax
print('jax', jax.__version__, jax.devices())
EOF
log "$CORES cores"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv >> "$LOG" 2>&1 || true

# ---- The plan.
if [ "$SMOKE" = 1 ]; then
  TINY='--config.model.stage_sizes=(1,1) --config.model.stage_widths=(8,16)
        --config.model.stem_width=8 --config.model.num_classes=10 --image_size=32'
  R18="--config=configs/resnet18.py $TINY"
  R50="--config=configs/resnet50.py $TINY"
  R101="--config=configs/resnet101.py $TINY"
  BATCH=${SMOKE_BATCH:-8}
  DTYPE=float32
  TIMING='--steps=2 --windows=2 --warmup=1'
  E2E_IMAGES=${E2E_IMAGES:-32}
  E2E_TIMING='--steps=2 --windows=2 --grain_workers=2'
  # The GPU's torch.compile, made to fail, so that its eager fallback is what runs here.
  TORCH_FLAGS="--torch_compile=yes --torch_compile_backend=${SMOKE_TORCH_BACKEND:-not_a_backend}"
else
  R18='--config=configs/resnet18.py'
  R50='--config=configs/resnet50.py'
  R101='--config=configs/resnet101.py'
  DTYPE=bfloat16
  TIMING='--steps=20 --windows=5 --warmup=5'
  # A few thousand JPEGs (~110 KB each), 5 logged windows of 20 steps (the first compiles);
  # grain workers on every core but one (the trainer's).
  E2E_IMAGES=${E2E_IMAGES:-4096}
  E2E_TIMING="--steps=20 --windows=4 --grain_workers=$(( CORES > 1 ? CORES - 1 : 1 ))"
  TORCH_FLAGS=''
  # Room for the largest batch (default 75%); the same for every JAX item.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
fi
COMMON="--dtype=$DTYPE $TIMING --peak_tflops=$PEAK_TFLOPS --compilation_cache_dir=$CACHE"

# item NAME MIN_S CAP_S [VAR=VALUE ...] -- MODULE FLAGS...
# Runs `python -m MODULE FLAGS --json` if at least MIN_S seconds of the budget are left, for at
# most CAP_S (or what is left), and appends its JSON line, tagged with NAME, to $RESULTS.
item() {
  local name=$1 min=$2 cap=$3
  shift 3
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  if [ -n "${ONLY:-}" ] && ! only "$name"; then
    record "$name" "skipped: not in ONLY" 0 ''
    return 1
  fi
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < min )); then
    log "skip $name: ${left}s of the budget left, it needs ${min}s"
    record "$name" "skipped: ${left}s of the budget left" 0 ''
    return 1
  fi
  local limit=$(( left < cap ? left : cap ))
  log "run $name (limit ${limit}s): ${envs[*]+${envs[*]}} $*"
  local t0 out rc
  t0=$(date +%s)
  # shellcheck disable=SC2068
  out=$(env ${envs[@]+"${envs[@]}"} timeout --kill-after=10 "$limit" "$PY" -m $@ --json \
        2>> "$LOG")
  rc=$?
  local wall=$(( $(date +%s) - t0 ))
  if (( rc != 0 )); then
    log "fail $name: exit $rc after ${wall}s (124 = out of time)"
    record "$name" "failed: exit $rc" "$wall" ''
    return 1
  fi
  log "done $name in ${wall}s"
  record "$name" ok "$wall" "$(echo "$out" | tail -n 1)"
}

only() {
  local want
  for want in $ONLY; do [[ $1 == "$want"* ]] && return 0; done
  return 1
}

record() {
  "$PY" - "$@" >> "$RESULTS" <<'EOF'
import json
import sys

name, status, wall, out = sys.argv[1:5]
try:
    result = json.loads(out) if out else {}
except ValueError:
    status, result = f'unreadable output: {out[-200:]!r}', {}
print(json.dumps({'item': name, 'status': status, 'wall_s': int(wall), **result}))
EOF
}

# The largest batch: the measured bytes per image at $BATCH, scaled to 90% of the memory JAX
# may use, in multiples of 64 (0 when the backend tracks no memory).
largest_batch() {
  "$PY" - "$RESULTS" "$BATCH" <<'EOF'
import json
import sys

path, batch = sys.argv[1], int(sys.argv[2])
rows = [json.loads(line) for line in open(path)]
row = next((r for r in rows if r['item'] == 'jax_r50_train' and r['status'] == 'ok'), None)
used = limit = None
if row:
    used = max(row.get('peak_memory_bytes') or 0, row.get('compiled_memory_bytes') or 0)
    limit = row.get('memory_limit_bytes')
if not used or not limit:
    print(0)
else:
    print(max(batch, int(0.9 * limit / (used / batch)) // 64 * 64))
EOF
}

# 1-2: ResNet-50 at $BATCH, then PyTorch at the same batch.
item jax_r50_train 30 200 -- bench.train_throughput $R50 --batch_size_per_device=$BATCH $COMMON
item torch_r50_train 60 240 -- bench.torch_baseline $R50 --batch_size_per_device=$BATCH $COMMON \
  $TORCH_FLAGS
# End to end: the trainer on generated JPEGs through grain (raw and prepared) vs on synthetic data.
item jax_r50_e2e 150 300 -- bench.input_bound $R50 --batch_size_per_device=$BATCH \
  --dtype=$DTYPE --images=$E2E_IMAGES --loaders=synthetic,grain_mp,grain_store_mp \
  --write_workers=$CORES $E2E_TIMING --compilation_cache_dir=$CACHE
# 3: inference, the other depths.
item jax_r50_inference 30 150 -- \
  bench.inference_throughput $R50 --batch_size_per_device=$BATCH $COMMON
item jax_r18_train 30 150 -- bench.train_throughput $R18 --batch_size_per_device=$BATCH $COMMON
item jax_r101_train 45 200 -- bench.train_throughput $R101 --batch_size_per_device=$BATCH $COMMON
# 1b: the largest batch that fits; if it does not, three quarters of it.
BMAX=$(largest_batch)
if (( BMAX > BATCH )); then
  item jax_r50_train_bmax 45 200 -- \
    bench.train_throughput $R50 --batch_size_per_device=$BMAX $COMMON \
  || item jax_r50_train_bmax_3q 45 200 -- \
    bench.train_throughput $R50 --batch_size_per_device=$(( BMAX * 3 / 4 / 64 * 64 )) $COMMON
else
  record jax_r50_train_bmax "skipped: no memory statistics" 0 ''
fi
# 4: XLA flags, one at a time, and ghost BN over each device's batch.
for flag in --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false \
            --xla_gpu_triton_gemm_any=true --xla_gpu_autotune_level=0; do
  name=jax_r50_train_flag_${flag#--xla_gpu_}
  item "${name//=/_}" 40 150 "XLA_FLAGS=${XLA_FLAGS:-} $flag" -- \
    bench.train_throughput $R50 --batch_size_per_device=$BATCH $COMMON
done
item jax_r50_train_ghost_bn 40 150 -- bench.train_throughput $R50 \
  --batch_size_per_device=$BATCH --config.model.bn_group_size=$BATCH $COMMON
# 5: the loop around the step.
item jax_r50_loop_overhead 60 200 -- bench.loop_overhead $R50 --batch_size_per_device=$BATCH \
  --dtype=$DTYPE $TIMING --compilation_cache_dir=$CACHE

# ---- One JSON and a table.
"$PY" - "$RESULTS" "$OUT" <<'EOF'
import json
import sys

from bench import common

MLPERF_PER_GPU = 7950  # MLPerf Training v4.0, NVIDIA MXNet + DALI, 8xH200: images/s per GPU
E2E_TARGET_PER_GPU = 8000  # issue 12: ResNet-50 end to end on real JPEGs, per H200
path, out = sys.argv[1:3]
rows = [json.loads(line) for line in open(path)]
by_item = {r['item']: r for r in rows}


def ips(name):
    row = by_item.get(name, {})
    return row.get('images_per_sec') if row.get('status') == 'ok' else None


ratios = {}
jax50, torch50 = ips('jax_r50_train'), ips('torch_r50_train')
if jax50 and torch50:  # against the compiled step, or the eager one where compiling failed
    compiled = by_item['torch_r50_train'].get('torch_compile')
    ratios[f"jax_over_torch_{'compile' if compiled else 'eager'}"] = jax50 / torch50
if jax50:
    ratios['jax_over_mlperf_v4_per_gpu'] = jax50 / MLPERF_PER_GPU
    for name, row in by_item.items():
        if name.startswith('jax_r50_train_') and ips(name):
            ratios[f'{name}_over_default'] = ips(name) / jax50
e2e = by_item.get('jax_r50_e2e', {})
if e2e.get('status') == 'ok':
    loaders = {r['loader']: r for r in e2e['rows']}
    for name, row in loaders.items():
        if name != 'synthetic' and row.get('vs_synthetic'):
            ratios[f'e2e_{name}_over_synthetic'] = row['vs_synthetic']
    best = max((r for n, r in loaders.items() if n != 'synthetic'),
               key=lambda r: r['images_per_sec'], default=None)
    if best:
        per_gpu = best['images_per_sec'] / e2e['devices']
        ratios[f'e2e_{best["loader"]}_per_gpu_over_target_{E2E_TARGET_PER_GPU}'] = (
            per_gpu / E2E_TARGET_PER_GPU)
summary = dict(items=rows, ratios=ratios, mlperf_v4_images_per_sec_per_gpu=MLPERF_PER_GPU,
               e2e_target_images_per_sec_per_gpu=E2E_TARGET_PER_GPU)
with open(f'{out}/gpu_results.json', 'w') as f:
    json.dump(summary, f, indent=1)


def table_rows(r):
    """One table row per item; the end-to-end item gets one per loader."""
    if 'rows' not in r:
        return [dict(r, loop_overhead_pct=r.get('overhead_pct'),
                     mfu_pct=100 * r['mfu'] if r.get('mfu') else None,
                     ms=r.get('ms_per_step') or r.get('loop_ms_per_step'),
                     images_per_sec=r.get('images_per_sec') or r.get('loop_images_per_sec'),
                     path=r.get('torch_path'))]
    return [dict(item=f"{r['item']} {row['loader']}", status=r['status'],
                 batch_size=r['batch_size'], dtype=r.get('dtype'),
                 ms=1e3 * r['batch_size'] / row['images_per_sec'],
                 images_per_sec=row['images_per_sec'], input_wait=row['input_wait_fraction'],
                 path=None if row['loader'] == 'synthetic' else
                 f"{'window + ' if r.get('window_decode') else ''}{r['decoder']}, "
                 f"{r.get('train_resizer')}, {row['workers']} workers",
                 wall_s=r['wall_s'])
            for row in r['rows']]


table = common.format_table(
    [t for r in rows for t in table_rows(r)],
    ['item', 'status', 'batch_size', 'dtype', 'ms', 'images_per_sec', 'mfu_pct', 'input_wait',
     'path', 'compile_s', 'first_step_s', 'peak_memory_bytes', 'loop_overhead_pct', 'wall_s'])
lines = [table, '', *(f'{k}: {v:.3f}' for k, v in ratios.items())]
with open(f'{out}/gpu_results.txt', 'w') as f:
    f.write('\n'.join(lines) + '\n')
print('\n'.join(lines))
EOF
rm -f "$RESULTS"
log "finished in $(( $(date +%s) - START ))s"
