#!/usr/bin/env bash
# One GPU session's check in at most 9 minutes: train images/s of capsjax (K = 1 and 4 ensemble
# members) and of the PyTorch peer (eager, torch.compile), then the 3-seed CapsNet-Fashion-MNIST
# recipe as one ensemble, cut at an epoch's end before the deadline; writes OUT/results.md.
#   source .gpu/env.sh && bash benchmarks/gpu_check.sh "$OUT"     # on the GPU machine
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh /tmp/gpu_check  # the same steps, tiny, on CPU
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
state=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_state.XXXXXX")
: > "$state/phases.tsv"
: > "$state/commands.txt"

# GPU_CHECK_BUDGET_S: the whole script's seconds. GPU_CHECK_WORKDIR: the ensemble's workdir,
# outside OUT, since its checkpoints would crowd out the 8 files the device tool brings back.
# GPU_CHECK_TRAIN_FLAGS: more capsjax.main flags. GPU_CHECK_SKIP_BENCH=1: training only.
smoke=${GPU_CHECK_SMOKE:-0}
seeds=0,1,2
config_module=configs.capsnet_fashion_mnist
config_file=configs/capsnet_fashion_mnist.py
if [[ $smoke == 1 ]]; then
  budget=${GPU_CHECK_BUDGET_S:-900}
  variant=smoke
  workdir=${GPU_CHECK_WORKDIR:-${TMPDIR:-/tmp}/gpu_check_cfm_smoke}
  data_flags=(--config.dataset=fashion_mnist --config.manual_dir=/usr/share/datasets/fashion-mnist
    --config.train_examples=256 --config.num_epochs=1)
  bench_steps=2 torch_warmup=1
  jax_cap=300 eager_cap=120 compile_cap=60 train_min=120 grace=30 reserve=15
else
  budget=${GPU_CHECK_BUDGET_S:-540}
  variant=
  workdir=${GPU_CHECK_WORKDIR:-${TMPDIR:-/tmp}/gpu_check_cfm}
  data_flags=(--config.manual_dir=.gpu/data --config.data_dir=/tmp/tfds)
  bench_steps=30 torch_warmup=3
  # Caps for the three benchmarks (three XLA compilations; eager; Inductor's compilation),
  # and the least the training keeps whatever they take.
  jax_cap=150 eager_cap=60 compile_cap=180 train_min=240 grace=30 reserve=15
fi
read -r -a extra_train_flags <<< "${GPU_CHECK_TRAIN_FLAGS:-}"
config_arg=$config_file${variant:+:$variant}
child=
train_rc=
train_note=
failed=0

# ------------------------------------------------------------------------------------------
# Helpers: phases under `timeout`, their output tee'd to a log in OUT; results.md after each.
# ------------------------------------------------------------------------------------------
left() { echo $((budget - SECONDS)); }

quote() {  # a command as one line to paste; the helpers' temporary paths shown as $TMP
  local a q=() plain='^[-A-Za-z0-9_./=:,@%+$]+$'
  for a in "$@"; do
    a=${a//$state/\$TMP}
    if [[ $a =~ $plain ]]; then q+=("$a"); else q+=("$(printf '%q' "$a")"); fi
  done
  echo "${q[*]}"
}

last_error() {  # LOG: its last error line (capsjax's one-line error, else the last line)
  local line
  line=$(grep -E '^capsjax: error|Error|error:' "$1" | tail -n 1) || true
  line=${line:-$(grep -v '^\s*$' "$1" | tail -n 1)}
  line=${line//|//}
  echo "${line//$'\t'/ }" | cut -c 1-200
}

note_phase() {  # NAME RC SECONDS LIMIT NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$state/phases.tsv"
}

# Runs CMD in the background (so that a signal to this script is handled at once), its
# output tee'd to LOG and this script's stdout; sets `rc`.
run_logged() {  # LOG LIMIT_S KILL_AFTER_S CMD...
  local log=$1 limit=$2 kill_after=$3 fd tee_pid
  shift 3
  quote "$@" >> "$state/commands.txt"
  printf '\n$ %s\n' "$(quote "$@")" | tee -a "$log"
  exec {fd}> >(tee -a "$log")
  tee_pid=$!
  timeout --preserve-status -k "$kill_after" "$limit" "$@" >&"$fd" 2>&1 &
  child=$!
  exec {fd}>&-
  rc=0
  wait "$child" || rc=$?
  child=
  wait "$tee_pid" 2>/dev/null || true
}

bench_phase() {  # NAME LOG CAP CMD...: a benchmark, skipped if it would eat the training's time
  local name=$1 log=$2 cap=$3 t0=$SECONDS limit
  shift 3
  limit=$(($(left) - reserve - grace - train_min))
  if ((limit > cap)); then limit=$cap; fi
  if [[ ${GPU_CHECK_SKIP_BENCH:-0} == 1 ]]; then
    note_phase "$name" - 0 0 "skipped (GPU_CHECK_SKIP_BENCH=1)"
    return
  fi
  if ((limit < 20)); then
    note_phase "$name" - 0 0 "skipped: ${limit} s left for it"
    return
  fi
  run_logged "$log" "$limit" 10 "$@"
  local note=ok
  if ((rc == 124 || rc == 137 || rc == 143)); then
    note="timed out at its ${limit} s limit"
  elif ((rc != 0)); then
    note="failed (exit $rc): $(last_error "$log")"
    failed=1
  fi
  note_phase "$name" "$rc" $((SECONDS - t0)) "$limit" "$note"
  write_results
}

epochs_done() {  # the fewest completed epochs over the members (rows of their epochs.csv)
  local min=-1 n s f
  for s in ${seeds//,/ }; do
    f=$workdir/seed-$s/epochs.csv
    n=0
    if [[ -f $f ]]; then n=$(($(wc -l < "$f") - 1)); fi
    if ((min < 0 || n < min)); then min=$n; fi
  done
  echo $((min < 0 ? 0 : min))
}

now_ms() {
  local t=${EPOCHREALTIME:-}
  if [[ -n $t ]]; then
    t=${t/[.,]/}
    echo $((10#$t / 1000))
  else
    echo $(($(date +%s) * 1000))
  fi
}

collect_files() {  # the members' epochs.csv and the ensemble's summary.json, into OUT
  local s
  for s in ${seeds//,/ }; do
    if [[ -f $workdir/seed-$s/epochs.csv ]]; then
      cp "$workdir/seed-$s/epochs.csv" "$out/epochs-seed-$s.csv" || true
    fi
  done
  if [[ -f $workdir/summary.json && $workdir/summary.json -nt $state/phases.tsv.start ]]; then
    cp "$workdir/summary.json" "$out/summary.json" || true
  fi
}

write_results() {
  collect_files
  GC_OUT=$out GC_STATE=$state GC_WORKDIR=$workdir GC_SEEDS=$seeds GC_SMOKE=$smoke \
    GC_BUDGET=$budget GC_ELAPSED=$SECONDS GC_DEVICE=${device:-?} \
    GC_VERSIONS=${versions:-?} GC_BATCH=${batch:-?} GC_CONFIG=$config_arg \
    GC_TRAIN_RC=$train_rc GC_TRAIN_NOTE=$train_note GC_EPOCH_MS=${epoch_wall_ms:-0} \
    "$py" "$state/results.py" 2> "$state/results.err" && return 0
  {
    echo "# GPU check (results.py failed: $(tail -n 1 "$state/results.err"))"
    echo
    echo "device: ${device:-?}; ${versions:-?}; elapsed ${SECONDS} s of ${budget} s"
    echo
    echo '```'
    cat "$state/phases.tsv"
    echo '```'
  } > "$out/results.md"
}

finish() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
    # timeout forwards SIGTERM to capsjax, which saves a checkpoint; SIGKILL after `grace`.
    kill -TERM "$child" 2>/dev/null || true
    local t=$SECONDS
    while kill -0 "$child" 2>/dev/null && ((SECONDS - t < grace)); do sleep 1; done
    kill -KILL "$child" 2>/dev/null || true
    local rc=0
    wait "$child" 2>/dev/null || rc=$?
    if [[ $train_rc == running ]]; then
      train_rc=$rc
      train_note=${train_note:-"gpu_check.sh was stopped (exit $status) during the training"}
      note_phase "ensemble training" "$rc" $((SECONDS - t0)) "$limit" "interrupted"
    fi
  fi
  write_results || true
  echo
  echo "gpu_check: $out/results.md (${SECONDS} s)"
  cat "$out/results.md" || true
  rm -rf "$state"
  if ((status == 0 && failed)); then status=1; fi
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
touch "$state/phases.tsv.start"

# ------------------------------------------------------------------------------------------
# The helper programs: results.md, and the PyTorch peer timed on the GPU.
# ------------------------------------------------------------------------------------------
cat > "$state/results.py" << 'PY'
"""Writes OUT/results.md from the phases' records, the logs and the ensemble's files."""

import csv
import json
import math
import os
import statistics

env = os.environ
out, state, workdir = env["GC_OUT"], env["GC_STATE"], env["GC_WORKDIR"]
seeds = env["GC_SEEDS"].split(",")
smoke = env["GC_SMOKE"] == "1"
PUBLISHED = 0.9362


def read(path):
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


def json_lines(path, key):
  rows = []
  for line in read(path).splitlines():
    if line.startswith("{") and key in line:
      try:
        rows.append(json.loads(line))
      except ValueError:
        pass
  return rows


def pct(x):
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


phases = [line.split("\t") for line in read(f"{state}/phases.tsv").splitlines() if line]
status = {p[0]: p[4] for p in phases}
lines = [f"# GPU check: capsjax on {env['GC_DEVICE']}", ""]
if smoke:
  lines += [
    (
      "**SMOKE MODE** (`GPU_CHECK_SMOKE=1`): the `:smoke` config's tiny model on 256 images "
      "and a few benchmark steps: a check of this script, not a measurement."
    ),
    "",
  ]
lines += [
  f"- recipe: `{env['GC_CONFIG']}`, seeds {env['GC_SEEDS']}",
  f"- device: {env['GC_DEVICE']}",
  f"- versions: {env['GC_VERSIONS']}",
  f"- elapsed: {env['GC_ELAPSED']} s of the script's {env['GC_BUDGET']} s budget",
  "",
  f"## Train throughput, batch {env['GC_BATCH']} per member",
  "",
  (
    "Synthetic batches, median step time over the timed steps (each waited for). capsjax: "
    "`benchmarks.ensemble` ('single' is the plain single-run step, K=k the ensemble step with "
    "k members); PyTorch: `benchmarks.torch_peer`'s model, loss and Adam on the same device."
  ),
  "",
  "| run | members | aggregate img/s | img/s per member | vs capsjax single | first call s |",
  "|---|---:|---:|---:|---:|---:|",
]
jax_runs = json_lines(f"{out}/bench_jax.log", '"backend"')
base = None
if jax_runs:
  r = jax_runs[-1]
  for row in r["results"]:
    agg = row["aggregate_img_s"]
    base = base or agg / row["members"]
    name = "capsjax single run" if row["run"] == "single" else f"capsjax ensemble {row['run']}"
    lines.append(
      f"| {name} | {row['members']} | {agg:.1f} | {agg / row['members']:.1f} | "
      f"{agg / base:.2f} | {row['compile_s']:.1f} |"
    )
else:
  lines.append(f"| capsjax | | {status.get('jax throughput', 'not run')} | | | |")
torch_runs = {r["mode"]: r for r in json_lines(f"{out}/bench_torch.log", '"peer"')}
for mode, label in (("eager", "PyTorch peer, eager"), ("compile", "PyTorch peer, torch.compile")):
  r = torch_runs.get(mode)
  if r:
    ratio = f"{r['train_img_s'] / base:.2f}" if base else ""
    lines.append(
      f"| {label} | 1 | {r['train_img_s']:.1f} | {r['train_img_s']:.1f} | {ratio} | "
      f"{r['first_step_s']:.1f} |"
    )
  else:
    lines.append(f"| {label} | | {status.get('torch ' + mode, 'not run')} | | | |")
if torch_runs:
  r = next(iter(torch_runs.values()))
  lines += [
    "",
    (
      f"PyTorch {r['torch']} on {r['device']}: TF32 matmul {r['tf32_matmul']}, cuDNN TF32 "
      f"{r['cudnn_tf32']}, cudnn.benchmark {r['cudnn_benchmark']} (PyTorch's defaults)."
    ),
  ]

# ------------------------------------------------------------------------------------------
# The ensemble.
# ------------------------------------------------------------------------------------------
member_config = {}
try:
  with open(f"{workdir}/seed-{seeds[0]}/config.json") as f:
    member_config = json.load(f)
except (OSError, ValueError):
  pass
target = member_config.get("num_epochs")
selected_on = "val" if member_config.get("val_examples") else "test"
summary = None
if os.path.exists(f"{out}/summary.json"):
  try:
    with open(f"{out}/summary.json") as f:
      summary = json.load(f)
  except ValueError:
    pass


def epoch_rows(seed):
  try:
    with open(f"{out}/epochs-seed-{seed}.csv", newline="") as f:
      return [r for r in csv.DictReader(f) if r.get("test_accuracy")]
  except OSError:
    return []


members = {}
for s in seeds:
  rows = epoch_rows(s)
  m = {"epochs": int(rows[-1]["epoch"]) if rows else 0, "seconds": []}
  if rows:
    best = max(rows, key=lambda r: (float(r["test_accuracy"]), -int(r["epoch"])))
    m.update(
      final=float(rows[-1]["test_accuracy"]),
      best=float(best["test_accuracy"]),
      best_epoch=int(best["epoch"]),
      seconds=[float(r["seconds"]) for r in rows if r.get("seconds")],
    )
    if rows[-1].get("selected_epoch"):
      m.update(
        selected=float(rows[-1]["selected_test_accuracy"]),
        selected_epoch=int(rows[-1]["selected_epoch"]),
      )
  if summary and f"seed-{s}" in summary.get("members", {}):
    sm = summary["members"][f"seed-{s}"]
    m.update(
      final=sm.get("final_test_accuracy"),
      selected=sm.get("selected_test_accuracy"),
      selected_epoch=sm.get("selected_epoch"),
      best=sm.get("best_test_accuracy"),
      best_epoch=sm.get("best_test_epoch"),
    )
    selected_on = sm.get("selected_on", selected_on)
  members[f"seed-{s}"] = m

reached = min((m["epochs"] for m in members.values()), default=0)
train_rc = env["GC_TRAIN_RC"]
complete = summary is not None and train_rc == "0"
lines += ["", f"## CapsNet-Fashion-MNIST, seeds {env['GC_SEEDS']} as one ensemble", ""]
if complete:
  lines.append(f"**Complete**: {reached} of {target} epochs (`summary.json` by capsjax).")
elif train_rc in ("", "-"):
  lines.append(f"**Not run**: {env['GC_TRAIN_NOTE'] or 'this script stopped before it'}.")
elif train_rc == "running":
  lines.append(f"**Running**: {reached} of {target or '?'} epochs so far.")
elif reached == 0:
  lines.append(f"**FAILED** (capsjax exit {train_rc}): {env['GC_TRAIN_NOTE']}")
else:
  lines.append(
    f"**PARTIAL: {reached} of {target or '?'} epochs reached** "
    f"(capsjax exit {train_rc}: {env['GC_TRAIN_NOTE'] or 'see train.log'}). The figures below "
    "are the members' epochs.csv rows: 'final' is the last completed epoch's test accuracy."
  )
lines += [
  "",
  f"| member | epochs | final | selected on {selected_on} (epoch) | best on test (epoch) |",
  "|---|---:|---:|---:|---:|",
]
for name, m in members.items():
  lines.append(
    f"| {name} | {m['epochs']} | {pct(m.get('final'))} | "
    f"{pct(m.get('selected'))} ({m.get('selected_epoch', '-')}) | "
    f"{pct(m.get('best'))} ({m.get('best_epoch', '-')}) |"
  )


def mean_std(key):
  values = [m[key] for m in members.values() if m.get(key) is not None]
  if not values:
    return "-"
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f} (n={len(values)})"


lines += [
  f"| mean ± std | | {mean_std('final')} | {mean_std('selected')} | {mean_std('best')} |",
  f"| published (CapsNet-Fashion-MNIST, Keras) | 100 | | | {pct(PUBLISHED)} |",
  "",
  "Protocol: the reference kept the checkpoint with the best `val_capsnet_acc` and its "
  "validation data was the test set, so **'best on test'** is the figure chosen as the "
  "published 93.62% was"
  + (
    " (here equal to 'selected', since `val_examples=0` makes capsjax select on test)"
    if selected_on == "test"
    else ""
  )
  + "; its README does not say whether 93.62% is that checkpoint or the final weights, "
  "which 'final' matches. Std is the sample standard deviation over members.",
]
secs = members.get(f"seed-{seeds[0]}", {}).get("seconds", [])[1:]
if secs:
  per_epoch = statistics.median(secs)
  lines.append(
    f"\nTraining time per epoch, the {len(seeds)} members together (epochs.csv `seconds`, "
    f"training only, median after the first): {per_epoch:.2f} s"
    + (f"; {target} epochs would take {per_epoch * target / 60:.1f} min." if target else ".")
  )
epoch_wall = int(env.get("GC_EPOCH_MS") or 0) / 1000
if epoch_wall:
  lines.append(
    f"Wall time per epoch (training, evaluation, checkpoints; the last interval this script "
    f"saw): {epoch_wall:.2f} s"
    + (f"; {target} epochs would take {epoch_wall * target / 60:.1f} min." if target else ".")
  )
if summary:
  lines.append(f"capsjax's wall time for the ensemble: {summary.get('wall_s', 0):.0f} s.")

# ------------------------------------------------------------------------------------------
# Phases and commands.
# ------------------------------------------------------------------------------------------
lines += [
  "",
  "## Wall times",
  "",
  "| phase | exit | seconds | limit s | status |",
  "|---|---:|---:|---:|---|",
]
lines += [f"| {' | '.join(p[:5])} |" for p in phases]
lines += [
  "",
  "## Commands (from the repository root, after `source .gpu/env.sh` on the GPU machine)",
  "",
  "```",
  *read(f"{state}/commands.txt").splitlines(),
  "```",
  "",
  (
    "$TMP/torch_peer_device.py is the harness gpu_check.sh writes from its heredoc. Logs: "
    "bench_jax.log, bench_torch.log, train.log; per member epochs-seed-<s>.csv; summary.json "
    "when the ensemble finished."
  ),
]
with open(f"{out}/results.md.tmp", "w") as f:
  f.write("\n".join(lines) + "\n")
os.replace(f"{out}/results.md.tmp", f"{out}/results.md")
PY

cat > "$state/torch_peer_device.py" << 'PY'
"""Train images/s of `benchmarks.torch_peer`'s CapsNet on the GPU (the CPU without one).

torch_peer times on the CPU only; this uses its model, loss, data and Adam on the device.
argv: eager|compile, batch, timed steps, warm-up steps.
"""

import json
import statistics
import sys
import time
import types

import torch
from benchmarks import torch_peer as tp

mode, batch, steps, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _zeros(*args, **kwargs):
  kwargs.setdefault("device", dev)
  return torch.zeros(*args, **kwargs)


# The peer's forward makes its routing logits with torch.zeros and no device: give its module
# a torch whose zeros defaults to `dev` (a global default device would also move Adam's step
# counters to the GPU and add a sync per parameter per step).
on_device = types.ModuleType("capsnet_peer_on_device")
on_device.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})
on_device.zeros = _zeros
tp.torch = on_device

torch.manual_seed(0)
model = tp.CapsNet().to(dev)
if tp.num_params(model) != tp.NUM_PARAMS:
  raise SystemExit(f"parameter count {tp.num_params(model):,} != {tp.NUM_PARAMS:,}")
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
images, labels = (t.to(dev) for t in tp._data(batch))
fwd = torch.compile(model) if mode == "compile" else model


def sync():
  if dev.type == "cuda":
    torch.cuda.synchronize()


def step():
  opt.zero_grad(set_to_none=True)
  lengths, recon = fwd(images, labels)
  tp.loss_fn(lengths, recon, images, labels).backward()
  opt.step()


t = time.perf_counter()
step()
sync()
first_s = time.perf_counter() - t
for _ in range(warmup):
  step()
sync()
times = []
for _ in range(steps):
  t = time.perf_counter()
  step()
  sync()
  times.append(time.perf_counter() - t)
step_s = statistics.median(times)
name = (
  torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
)
print(
  f"PyTorch {torch.__version__} peer ({mode}) on {name}: batch {batch}, median of {steps} "
  f"steps {1e3 * step_s:.2f} ms = {batch / step_s:.1f} train images/s; first step {first_s:.1f} s"
)
print(
  json.dumps(
    {
      "peer": "torch",
      "mode": mode,
      "device": name,
      "torch": torch.__version__,
      "batch": batch,
      "steps": steps,
      "step_s": step_s,
      "train_img_s": batch / step_s,
      "first_step_s": first_s,
      "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
      "cudnn_tf32": torch.backends.cudnn.allow_tf32,
      "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
  )
)
PY

# ------------------------------------------------------------------------------------------
# 0. The machine, the versions, the recipe's batch.
# ------------------------------------------------------------------------------------------
if command -v nvidia-smi > /dev/null; then
  device=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2> /dev/null | head -n 1) || device=
fi
device=${device:-"no GPU ($(uname -m) CPU, $(nproc) cores)"}
versions=$(timeout 30 "$py" -c '
import importlib.metadata as m
found = []
for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch"):
  try:
    found.append(f"{p} {m.version(p)}")
  except m.PackageNotFoundError:
    pass
print(", ".join(found))' 2>&1) || versions="unknown ($versions)"
batch=$(timeout 60 "$py" -c "
import importlib, sys
print(importlib.import_module('$config_module').get_config(sys.argv[1] or None).batch_size)" \
  "$variant" 2> "$state/batch.err") || batch=
if ! [[ $batch =~ ^[0-9]+$ ]]; then
  echo "gpu_check: could not read the batch size from $config_file: $(tail -n 1 "$state/batch.err")"
  batch=100
fi
echo "gpu_check: $device; $versions; batch $batch; budget ${budget} s; OUT=$out"
note_phase "set-up" 0 "$SECONDS" - ok
write_results

# ------------------------------------------------------------------------------------------
# 1. Throughput.
# ------------------------------------------------------------------------------------------
bench_phase "jax throughput" "$out/bench_jax.log" "$jax_cap" \
  "$py" -m benchmarks.ensemble "--config=$config_arg" --members=1,4 "--steps=$bench_steps"
if "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
  bench_phase "torch eager" "$out/bench_torch.log" "$eager_cap" \
    "$py" "$state/torch_peer_device.py" eager "$batch" "$bench_steps" "$torch_warmup"
  bench_phase "torch compile" "$out/bench_torch.log" "$compile_cap" \
    "$py" "$state/torch_peer_device.py" compile "$batch" "$bench_steps" "$torch_warmup"
else
  note_phase "torch eager" - 0 0 "skipped: no torch for $py"
  note_phase "torch compile" - 0 0 "skipped: no torch for $py"
fi

# ------------------------------------------------------------------------------------------
# 2. The recipe, 3 seeds as one ensemble, in the time the benchmarks left. The full recipe
# (100 epochs) runs, and gets SIGTERM as soon as its next epoch would end past the deadline:
# capsjax saves a checkpoint and exits 75. Its learning rate decays per epoch (0.95 ** epoch)
# whatever num_epochs is, so a run cut after E epochs is the full recipe's first E epochs.
# ------------------------------------------------------------------------------------------
train_cmd=("$py" -m capsjax.main "--config=$config_arg" "--workdir=$workdir" "--config.seeds=$seeds"
  "${data_flags[@]}" --config.progress_bar=False ${extra_train_flags[@]+"${extra_train_flags[@]}"})
t0=$SECONDS
limit=$(($(left) - reserve - grace))
if ((limit < 30)); then
  note_phase "ensemble training" - 0 "$limit" "skipped: ${limit} s left"
  train_note="skipped: no time left"
else
  quote "${train_cmd[@]}" >> "$state/commands.txt"
  printf '\n$ %s\n' "$(quote "${train_cmd[@]}")" | tee -a "$out/train.log"
  exec {train_fd}> >(tee -a "$out/train.log")
  tee_pid=$!
  timeout --preserve-status -k "$grace" "$limit" "${train_cmd[@]}" >&"$train_fd" 2>&1 &
  child=$!
  exec {train_fd}>&-
  train_rc=running
  deadline_ms=$(($(now_ms) + 1000 * limit))
  done_n=$(epochs_done) last_ms=$(now_ms) epoch_ms=0 sent=0
  while kill -0 "$child" 2> /dev/null; do
    sleep 1
    n=$(epochs_done)
    if ((n > done_n)); then
      # The first interval holds the start-up (data, compilation): not an epoch's time.
      first=$((epoch_ms == 0))
      epoch_ms=$((($(now_ms) - last_ms) / (n - done_n)))
      done_n=$n last_ms=$(now_ms)
      if ((!first)); then epoch_wall_ms=$epoch_ms; fi
      write_results
      # The next epoch (one more interval, 10% and 3 s to spare) would end past the
      # deadline: stop now, while the checkpoint is at this epoch's end.
      if ((!sent && !first && last_ms + epoch_ms * 11 / 10 + 3000 > deadline_ms)); then
        train_note="stopped after epoch $n: the next would end past the ${budget} s budget"
        echo "gpu_check: $train_note (epoch ~$((epoch_ms / 1000)) s); SIGTERM"
        kill -TERM "$child" 2> /dev/null || true
        sent=1
      fi
    fi
  done
  train_rc=0
  wait "$child" || train_rc=$?
  child=
  wait "$tee_pid" 2> /dev/null || true
  if ((train_rc == 0)); then
    note=ok
  elif ((train_rc == 75)); then
    note="checkpoint saved at SIGTERM (exit 75)"
    train_note=${train_note:-"the ${limit} s limit sent SIGTERM mid-epoch"}
  elif ((train_rc == 124 || train_rc == 137 || train_rc == 143)); then
    note="killed (exit $train_rc)"
    train_note=${train_note:-"killed at the ${limit} s limit before it could save"}
  else
    note="failed (exit $train_rc)"
    train_note=${train_note:-"$(last_error "$out/train.log")"}
    failed=1
  fi
  note_phase "ensemble training" "$train_rc" $((SECONDS - t0)) "$limit" "$note"
fi
write_results
