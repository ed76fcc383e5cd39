#!/usr/bin/env bash
# One call on a lent GPU machine (JAX 0.11, Python 3.12): cljax's step and full pipeline
# against the bare reference step on the same card, then the test suite under JAX 0.11.
#
# Needs, in the ignored folder .whl/ (see docs/benchmarks.md, "On a GPU"): the wheels of
# the shared gpu-py312 folder, simplejpeg's (pip download simplejpeg --python-version 3.12
# --only-binary=:all: --no-deps -d .whl), bare_simclr_step.py, and CIFAR-10's test.npz +
# meta.json.
# Writes JSONL rows and logs under $OUT (default: runs/gpu_check) and prints a table.
# Each part has its own time cap and runs whatever the parts before it did; the whole
# stays inside BUDGET_S seconds (default 580), so one device call of 600 s holds it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-580}
START=$(date +%s)

# Runs "$@" for at most min(cap, what is left of the budget) seconds; logs to $OUT/$name.log.
part() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START) - 5))
  local t=$((cap < left ? cap : left))
  if ((t < 20)); then
    echo "== $name: skipped (budget spent)"
    return
  fi
  echo "== $name (cap ${t}s, at $(($(date +%s) - START))s)"
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1
  echo "   rc=$? after $(($(date +%s) - START))s"
}

python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint, grain; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

# ResNet-50 first: the bare step, then cljax's step and full path with the decode-only
# input (data.crop_on_device), then the step alone without photometric augmentation and
# without the online probe, which breaks the step's own gap down.
R50=(--config=configs/simclr_r50.py --config.data.source=encoded_npz
  --config.data.data_dir=/tmp/jpeg224 --config.data.global_batch_size=256
  --config.data.num_workers=14 --config.data.crop_on_device=True
  --config.train.log_every_steps=50 --modes=host --windows=3 --steps_per_window=10)
part ref_r50 120 python3 .whl/bare_simclr_step.py r50_512
part jpeg224 40 python3 benchmarks/host_pipeline.py --out_dir=/tmp/jpeg224 --num_images=2048
part cljax_r50 200 python3 -m cljax.bench "${R50[@]}" --parts=step,full,input \
  --output="$OUT/cljax_r50.jsonl"
part cljax_r50_nophoto 90 python3 -m cljax.bench "${R50[@]}" --parts=step \
  --config.data.augment.photometric=False --output="$OUT/cljax_r50_nophoto.jsonl"
part cljax_r50_noprobe 90 python3 -m cljax.bench "${R50[@]}" --parts=step \
  --config.data.augment.photometric=False --config.evals.online_probe=False \
  --output="$OUT/cljax_r50_noprobe.jsonl"
part host_jpeg 70 python3 -m cljax.bench --config=configs/simclr_r50.py --parts=host_jpeg \
  --jpeg_workers=0,14 --windows=3 --output="$OUT/host_jpeg.jsonl"
part ref_r18c 140 python3 .whl/bare_simclr_step.py r18c_4096
part cljax_r18c 160 python3 -m cljax.bench --config=configs/simclr_cifar10.py \
  --config.data.source=encoded_npz --config.data.data_dir=.whl \
  --config.data.train_split=test --config.data.global_batch_size=2048 \
  --config.train.log_every_steps=100 --modes=device --parts=matmul,step,full,input \
  --windows=5 --steps_per_window=25 --output="$OUT/cljax_r18c.jsonl"
# The test suite under JAX 0.11 (on the CPU backend with 8 fake devices, as in CI).
part pytest 150 python3 -m pytest tests -n 16 -o addopts= -v -rfE -p no:cacheprovider --timeout=150

grep -h '^{' "$OUT/ref_r18c.log" "$OUT/ref_r50.log" >"$OUT/reference.jsonl" 2>/dev/null
grep -E " (FAILED|ERROR) |passed|failed" "$OUT/pytest.log" | tail -15
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def rows(name):
  p = out / name
  return [json.loads(l) for l in p.read_text().splitlines() if l.startswith("{")] if p.exists() else []
ref = {r.get("views"): r for r in rows("reference.jsonl") if "views" in r}
for r in rows("host_jpeg.jsonl"):
  if r["part"] == "host_jpeg":
    print(f"host_jpeg {r['path']} workers={r['num_workers']}: {r['images_per_s_per_core']} images/s per core")
cases = (("r50_512", 512, "cljax_r50.jsonl"), ("r50_512", 512, "cljax_r50_nophoto.jsonl"),
         ("r50_512", 512, "cljax_r50_noprobe.jsonl"), ("r18c_4096", 4096, "cljax_r18c.jsonl"))
for case, views, f in cases:
  base = ref.get(views, {}).get("views_per_s")
  print(f"{case} {f}: reference {base} views/s")
  for r in rows(f):
    if r["part"] in ("step", "full", "input", "matmul"):
      v = r.get("views_per_s") or r.get("tflops")
      ratio = f"{v / base:.3f}" if base and r.get("views_per_s") else "-"
      print(f"  {r['part']:6} {r.get('mode', ''):6} {v} ratio_to_reference={ratio}")
EOF
