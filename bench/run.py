"""``make bench``: click-to-prediction latency through a live MONAI Label server, model-only latency,
nine-view extraction against the rotate-and-slice reference, and peak memory.

Targets on the 2-core CPU machine: warm click <= 1.0 s, server overhead <= 10 % of model time,
nine-view extraction >= 10x the reference, peak RSS <= 2 GB. Results go to bench/results/latest.json.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from oncofusion.serving.launcher import REPO_ROOT, LocalServer

LUNG_BUNDLE = REPO_ROOT / "bundles" / "lung_nodule_clip"
SAMPLE_MANIFEST = REPO_ROOT / "sample_data" / "lung" / "manifest.json"
RESULTS = REPO_ROOT / "bench" / "results" / "latest.json"
LARGE_SHAPE = (512, 512, 300)
WARM_CLICKS = 20

logger = logging.getLogger("bench")


def _timed(fn, repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def make_large_ct(out_dir: Path) -> tuple[str, list[int]]:
    """A 512x512x300 int16 gzip NIfTI: the first sample case, reflected out to clinical size.

    Returns the image id and the nodule click (IJK).
    """
    case = json.loads(SAMPLE_MANIFEST.read_text())["cases"][0]
    source = nib.load(SAMPLE_MANIFEST.parent / case["image"])
    volume = np.asarray(source.dataobj)
    pad = [(0, target - size) for size, target in zip(volume.shape, LARGE_SHAPE, strict=True)]
    large = np.pad(volume, pad, mode="reflect").astype(np.int16)
    image_id = "bench_ct_512x512x300"
    out_dir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(large, source.affine), out_dir / f"{image_id}.nii.gz")
    return image_id, [int(v) for v in case["center_ijk"]]


def bench_server(studies: Path, image_id: str, click: list[int], work_dir: Path) -> dict[str, Any]:
    from monailabel.client import MONAILabelClient

    conf = {"bundles": str(LUNG_BUNDLE.parent), "models": LUNG_BUNDLE.name}
    with LocalServer(studies, work_dir, conf) as server:
        client = MONAILabelClient(server.url, tmpdir=str(work_dir))
        client.info()  # builds the model, as a client opening a session does

        def click_once() -> dict[str, Any]:
            start = time.perf_counter()
            _, params = client.infer(LUNG_BUNDLE.name, image_id, {"foreground": [click]})
            params = json.loads(params) if isinstance(params, str) else params
            return {"wall": time.perf_counter() - start, **params["latencies"]}

        first = click_once()
        warm = [click_once() for _ in range(WARM_CLICKS)]
        rss = server.peak_rss_bytes()
    wall = statistics.median(c["wall"] for c in warm)
    model = statistics.median(c["predict"] for c in warm)
    return {
        "first_click_s": first["wall"],
        "first_click_decode_s": first["load"],
        "warm_click_median_s": wall,
        "warm_model_in_server_median_s": model,
        "warm_label_write_median_s": statistics.median(c["write"] for c in warm),
        "server_overhead_fraction": (wall - model) / model,
        "server_peak_rss_mb": rss / 2**20,
    }


def bench_model(studies: Path, image_id: str, click: list[int]) -> dict[str, Any]:
    import torch
    from monai.bundle import ConfigParser

    from oncofusion.contract import Roi
    from oncofusion.io.readers import read_volume

    torch.set_num_threads(1)  # as the server runs inference (apps/oncofusion, conf infer_threads)
    parser = ConfigParser()
    parser.read_config(str(LUNG_BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(LUNG_BUNDLE)
    predictor = parser.get_parsed_content("predictor")
    decode_s, image = _timed(lambda: read_volume(studies / f"{image_id}.nii.gz"), 1)
    roi = Roi(points=[tuple(click)])
    predictor.predict({"image": image}, roi, {})
    model_s, _ = _timed(lambda: predictor.predict({"image": image}, roi, {}), WARM_CLICKS)
    return {"model_only_median_s": model_s, "decode_512x512x300_s": decode_s,
            "num_fold_models": len(predictor.ensemble.members())}


def bench_nine_views() -> dict[str, Any]:
    from scipy.ndimage import gaussian_filter

    from oncofusion.models.lung_nodule.nine_views import extract_nine_views, reference_nine_views

    cube = gaussian_filter(np.random.default_rng(0).normal(size=(64, 64, 64)), 2).astype(np.float32)
    fast_s, _ = _timed(lambda: extract_nine_views(cube, 50, 50, order=3), 10)
    reference_s, _ = _timed(lambda: reference_nine_views(cube, 50, order=3), 3)
    return {"nine_views_s": fast_s, "nine_views_reference_s": reference_s, "nine_views_speedup": reference_s / fast_s}


def table(results: dict[str, Any]) -> str:
    rows = [
        ("warm click-to-prediction (median of 20)", f"{results['warm_click_median_s']:.3f} s", "<= 1.0 s",
         results["warm_click_median_s"] <= 1.0),
        ("first click (decode + predict)", f"{results['first_click_s']:.3f} s", "", None),
        ("model-only latency (median of 20)", f"{results['model_only_median_s']:.3f} s", "", None),
        ("server overhead / model time", f"{100 * results['server_overhead_fraction']:.1f} %", "<= 10 %",
         results["server_overhead_fraction"] <= 0.10),
        ("nine-view speedup vs rotate reference", f"{results['nine_views_speedup']:.1f} x", ">= 10 x",
         results["nine_views_speedup"] >= 10),
        ("server peak RSS", f"{results['server_peak_rss_mb']:.0f} MB", "<= 2048 MB",
         results["server_peak_rss_mb"] <= 2048),
    ]
    lines = [f"{'measure':42s} {'value':>12s} {'target':>12s}  met"]
    for name, value, target, met in rows:
        lines.append(f"{name:42s} {value:>12s} {target:>12s}  {'' if met is None else ('yes' if met else 'NO')}")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        image_id, click = make_large_ct(studies)
        results: dict[str, Any] = {"machine": "this machine's CPU", "image_shape": list(LARGE_SHAPE)}
        results.update(bench_nine_views())
        results.update(bench_model(studies, image_id, click))
        results.update(bench_server(studies, image_id, click, Path(tmp) / "server"))
    from bench.bone import bench_bone

    results["bone_tumor_matrix"] = bench_bone()
    from bench.thyroid import bench_thyroid

    results["thyroid_llnm"] = bench_thyroid()
    from bench.rectal import bench_rectal

    results["rectal_erus_clip"] = bench_rectal()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(table(results))
    bone = results["bone_tumor_matrix"]
    print("\nbone_tumor_matrix: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in bone.items()))
    for name in ("thyroid_llnm", "rectal_erus_clip"):
        print(f"\n{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in results[name].items()))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
