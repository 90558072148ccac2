#!/usr/bin/env bash
# GPU check (issue 14): training-step throughput of our engine against the reference's recipe on one GPU.
#
# For a GPU machine with Python, torch (+ numpy, which torchvision brings) and no network: none of the project's
# other dependencies (no mlflow, av, pydantic, yaml, pytorchvideo). From the repository root:
#
#     bash benchmarks/gpu_check.sh                  # results in benchmarks/results/gpu/
#     OUT=/some/folder bash benchmarks/gpu_check.sh
#
# What it does, writing nothing outside the tree but $OUT (caches and temp files go to $OUT/.scratch, removed at
# the end; pip keeps no cache):
#   1. puts src/ on PYTHONPATH: the package is used in place, nothing is installed into the environment;
#   2. only if `import tqdm` fails, installs tqdm (the engine's progress bar) from benchmarks/wheels/ into
#      $OUT/.scratch/site with pip --no-index. Without it, or without numpy, training.py still runs: it times an
#      inline copy of the engine's step, and its JSON says so under setup.engine;
#   3. runs benchmarks/training.py --device cuda on resnet18, resnet50 and resnext101 at 16x112x112, torch.compile
#      on, under `timeout` (the JSON is rewritten after every model, so a run cut short keeps what it measured),
#      and prints a summary: the whole script stays under 8 minutes;
#   4. benchmarks/multinode.py: one GPU against every GPU of the machine (DDP, the demo network), the scaling
#      efficiency (clips/s per GPU with all of them over clips/s with one), under 2 minutes;
#   5. OPTIONAL, skipped on a bare machine: a short real training stage on demo data (synth -> split -> cache ->
#      pretrain for 2 epochs on the GPU, MLflow into $OUT/.scratch) runs only where
#      `python -c "import av, mlflow, pydantic, yaml, pytorchvideo, torchvision"` works. Those packages cannot travel
#      with the tree (PyAV's wheel alone is tens of MB, mlflow with its dependencies far more than the 64 MiB
#      allowed), so benchmarks/wheels/ carries only tqdm.
# Other knobs (environment): PYTHON (default python3), DEVICE (cuda), TRAINING_ARGS (training.py's models and
# schedule), STAGE_DEVICE (cuda): DEVICE=cpu STAGE_DEVICE=cpu TRAINING_ARGS="--quick --models resnet18" is a smoke
# test of this script on a CPU.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SCRATCH="$OUT/.scratch"
mkdir -p "$SCRATCH/tmp" "$SCRATCH/cache"
trap 'rm -rf "$SCRATCH"' EXIT
PY="${PYTHON:-python3}"
START=$(date +%s)

# everything a library would write under $HOME or /tmp goes to the scratch folder
export TMPDIR="$SCRATCH/tmp" XDG_CACHE_HOME="$SCRATCH/cache" TORCHINDUCTOR_CACHE_DIR="$SCRATCH/cache/inductor"
export TRITON_CACHE_DIR="$SCRATCH/cache/triton" CUDA_CACHE_PATH="$SCRATCH/cache/nv" PYTHONDONTWRITEBYTECODE=1
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MPLCONFIGDIR="$SCRATCH/cache/mpl"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

echo "== environment"
"$PY" - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}")
EOF
"$PY" -c "import action3d.models" || { echo "action3d.models does not import with torch alone"; exit 1; }
echo "action3d.models imports with torch alone"

if ! "$PY" -c "import tqdm" 2>/dev/null; then
    if ls benchmarks/wheels/tqdm-*.whl >/dev/null 2>&1; then
        # pip's closing dependency check complains about the project's own metadata where src/*.egg-info exists
        if "$PY" -m pip install --quiet --no-deps --no-index --find-links benchmarks/wheels --target "$SCRATCH/site" \
                tqdm 2>"$SCRATCH/pip.log"; then
            export PYTHONPATH="$PYTHONPATH:$SCRATCH/site"
            echo "tqdm installed from benchmarks/wheels into the scratch folder"
        else
            cat "$SCRATCH/pip.log"
            echo "tqdm did not install: training.py will time an inline copy of the engine's step"
        fi
    else
        echo "no tqdm and no wheel for it: training.py will time an inline copy of the engine's step"
    fi
fi
"$PY" -c "import action3d.engine" 2>/dev/null && echo "action3d.engine imports" \
    || echo "action3d.engine does not import (numpy or tqdm missing): the inline copy stands in"

echo "== training step: reference recipe vs ours (bf16, channels_last_3d, compile)"
status=0
read -r -a TARGS <<< "${TRAINING_ARGS:---models resnet18 resnet50 resnext101 --steps 10 --warmup 3 --repeats 5}"
timeout --kill-after=10 330 "$PY" benchmarks/training.py --device "${DEVICE:-cuda}" "${TARGS[@]}" \
    --out "$OUT/training.json" 2>&1 | tee "$OUT/training.log" || status=$?
[ "$status" -eq 0 ] || echo "training.py exited with status $status (124: timed out; partial JSON kept)"

echo "== summary"
"$PY" - "$OUT/training.json" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
s = r["setup"]
print(f"{s['device_name']}, torch {s['torch']}, compile {s['compile']}, engine: {s['engine']}, "
      f"complete: {s['complete']}, {s['seconds']:.0f} s")
print("practical peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in r["practical_peak_gflops"].items()))
for name, m in r["results"].items():
    parts = []
    for k, v in m["recipes"].items():
        mfu = f"{100 * v['mfu']:.0f}% of {v['mfu_peak']}" if v["mfu"] is not None else "-"
        ratio = f", {m['ratios'][k]:.2f}x" if k in m["ratios"] else ""
        kernels = "" if v["kernel_check"]["ok"] else ", CONVOLUTIONS WRONG"
        parts.append(f"{k} {v['clips_per_s']:.1f} clips/s ({mfu}{ratio}{kernels})")
    print(f"{name} (batch {m['batch']}): " + "; ".join(parts))
g = r.get("goal")
if g:
    print(f"goal: ours >= {g['target_ratio']}x reference for resnet18: {g['ratio']:.2f}x, "
          f"{'met' if g['met'] else 'MISSED'}{'' if g['kernels_correct'] else ' (its convolutions are wrong)'}")
EOF

echo "== scaling: one GPU against every GPU of the machine (DDP, our engine, the demo network)"
if "$PY" -c "import action3d.engine" 2>/dev/null; then
    timeout --kill-after=10 120 "$PY" benchmarks/multinode.py --device "${DEVICE:-cuda}" --layouts 1x1 1xall \
        --steps 10 --repeats 3 --out "$OUT/multinode.json" 2>&1 | tail -4 || echo "multinode.py failed or timed out"
else
    echo "skipped: action3d.engine does not import here"
fi

echo "== optional: a short real training stage on demo data"
if "$PY" -c "import av, mlflow, pydantic, yaml, pytorchvideo, torchvision" 2>/dev/null; then
    LEFT=$((480 - ($(date +%s) - START) - 15))
    if [ "$LEFT" -gt 60 ]; then
        W="$SCRATCH/demo"
        export MLFLOW_TRACKING_URI="sqlite:///$W/mlflow.db"
        S=(--params "$PWD/params.yaml" -S synth.sets.pretrain.classes=4 -S synth.sets.pretrain.train_per_class=8
           -S synth.sets.pretrain.val_per_class=2 -S scratch.pretrain.epochs=2 -S scratch.pretrain.warmup_epochs=1
           -S scratch.pretrain.device=${STAGE_DEVICE:-cuda} -S scratch.pretrain.nproc=1)
        mkdir -p "$W"
        # the stages as dvc.yaml runs them, in a project folder of their own (data.pretrain.path is relative to it)
        (cd "$W" && timeout --kill-after=10 "$LEFT" bash -c '
            set -e
            "$0" -m action3d.cli stage synth --role pretrain --out data/demo/pretrain "$@"
            "$0" -m action3d.cli stage split --role pretrain --out data/splits/pretrain "$@"
            "$0" -m action3d.cli stage cache --role pretrain --videos data/splits/pretrain/slices/0.csv \
                --out data/cache/pretrain/slice-0 "$@"
            "$0" -m action3d.cli stage scratch --role pretrain --manifests data/splits/pretrain --cache data/cache/pretrain \
                --out runs/scratch/pretrain "$@"
        ' "$PY" "${S[@]}") 2>&1 | tee "$OUT/stage.log" | tail -5 || echo "the demo stage failed or timed out"
        cp "$W/runs/scratch/pretrain/history.csv" "$OUT/stage_history.csv" 2>/dev/null || true
    else
        echo "skipped: ${LEFT}s left of the 8-minute budget"
    fi
else
    echo "skipped: av, mlflow, pydantic, yaml, pytorchvideo or torchvision is missing here (they cannot travel)"
fi
echo "== done in $(($(date +%s) - START)) s; results in $OUT"
