"""``make bench``: click-to-prediction latency through a live MONAI Label server, model-only latency,
nine-view extraction against the rotate-and-slice reference, and peak memory.

Targets on the 2-core CPU machine: first click (decode included) <= 1.0 s, warm click <= 0.3 s, server
overhead <= 50 % of model time, nine-view extraction >= 10x the reference, server peak RSS <= 1.5 GB.
The machine is shared, so every timing is also given as a ratio to a fixed numpy/torch workload
(:func:`reference_s`) timed right before it: a ratio moves with the code, not with the machine's load.
Each session starts as 3D Slicer's does: the client downloads the study, then clicks at once (no time to
look at it), so the first click waits for whatever of the server's background decode is left. A second
server on the same studies then times the first click of a later session, which finds the volume already
decoded on disk. Per-request logging goes to the servers' log files, not the terminal.
Results go to bench/results/latest.json.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
import warnings
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
#: seconds to wait for the server to commit the decoded volume before the second session starts
COMMIT_WAIT_S = 60.0
#: the targets, by result key: (limit, "max" or "min")
TARGETS = {
    "first_click_s": (1.0, "max"),
    "warm_click_median_s": (0.3, "max"),
    "server_overhead_fraction": (0.5, "max"),
    "nine_views_speedup": (10.0, "min"),
    "server_peak_rss_mb": (1536.0, "max"),
}

logger = logging.getLogger("bench")


def reference_s(repeats: int = 3) -> float:
    """Median time of a fixed workload (a numpy sort and one-thread torch matrix products, about the
    memory and compute mix of a click) on this machine now: the yardstick of every ratio."""
    import torch

    values = np.random.default_rng(0).random(1_000_000)
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))

    def work() -> None:
        np.sort(values)
        for _ in range(20):
            a @ a

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed(work, repeats)[0]
    finally:
        torch.set_num_threads(threads)


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


def _click(client: Any, image_id: str, click: list[int]) -> dict[str, Any]:
    """One click through the client: wall time, the server's stage latencies and the reference timed
    right before it."""
    reference = reference_s(1)
    start = time.perf_counter()
    _, params = client.infer(LUNG_BUNDLE.name, image_id, {"foreground": [click]})
    params = json.loads(params) if isinstance(params, str) else params
    return {"wall": time.perf_counter() - start, "reference": reference, **params["latencies"]}


def _download(url: str, image_id: str) -> float:
    """Fetch the study as 3D Slicer does before any click (``/datastore/image``); seconds taken."""
    import urllib.request

    start = time.perf_counter()
    with urllib.request.urlopen(f"{url}/datastore/image?image={image_id}", timeout=600) as response:
        while response.read(1 << 20):
            pass
    return time.perf_counter() - start


def _wait_for_commit(studies: Path) -> bool:
    """Whether the server committed a decoded volume (its JSON record) under the studies."""
    from oncofusion.serving.infer_task import DECODED_DIR

    deadline = time.time() + COMMIT_WAIT_S
    while time.time() < deadline:
        if any((studies / DECODED_DIR).glob("*.json")):
            return True
        time.sleep(0.5)
    return False


def bench_server(studies: Path, image_id: str, click: list[int], work_dir: Path) -> dict[str, Any]:
    from monailabel.client import MONAILabelClient

    conf = {"bundles": str(LUNG_BUNDLE.parent), "models": LUNG_BUNDLE.name}
    with LocalServer(studies, work_dir / "session1", conf) as server:
        client = MONAILabelClient(server.url, tmpdir=str(work_dir))
        client.info()  # builds the model, as a client opening a session does
        download = _download(server.url, image_id)
        first = _click(client, image_id, click)
        warm = [_click(client, image_id, click) for _ in range(WARM_CLICKS)]
        rss = server.peak_rss_bytes()
    committed = _wait_for_commit(studies)
    with LocalServer(studies, work_dir / "session2", conf) as server:
        client = MONAILabelClient(server.url, tmpdir=str(work_dir))
        client.info()
        _download(server.url, image_id)
        later = _click(client, image_id, click)
        rss_later = server.peak_rss_bytes()

    def median(field: str) -> float:
        return statistics.median(c[field] for c in warm)

    wall, model = median("wall"), median("predict")
    return {
        "download_s": download,
        "first_click_s": first["wall"],
        "first_click_ratio": first["wall"] / first["reference"],
        "first_click_stages_s": {k: first[k] for k in ("load", "predict", "write", "total")},
        "warm_click_median_s": wall,
        "warm_click_ratio": wall / median("reference"),
        "warm_load_median_s": median("load"),
        "warm_model_in_server_median_s": model,
        "warm_label_write_median_s": median("write"),
        "warm_server_total_median_s": median("total"),
        "server_overhead_fraction": (wall - model) / model,
        "server_peak_rss_mb": rss / 2**20,
        "later_session_first_click_s": later["wall"],
        "later_session_first_click_ratio": later["wall"] / later["reference"],
        "later_session_load_s": later["load"],
        "later_session_found_committed_volume": committed,
        "later_session_peak_rss_mb": rss_later / 2**20,
        "reference_s": median("reference"),
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
    reference = reference_s()
    decode_s, image = _timed(lambda: read_volume(studies / f"{image_id}.nii.gz"), 1)
    roi = Roi(points=[tuple(click)])
    predictor.predict({"image": image}, roi, {})
    model_s, _ = _timed(lambda: predictor.predict({"image": image}, roi, {}), WARM_CLICKS)
    return {"model_only_median_s": model_s, "decode_512x512x300_s": decode_s,
            "decode_512x512x300_ratio": decode_s / reference, "num_fold_models": len(predictor.ensemble.members())}


def bench_nine_views() -> dict[str, Any]:
    from scipy.ndimage import gaussian_filter

    from oncofusion.models.lung_nodule.nine_views import extract_nine_views, reference_nine_views

    cube = gaussian_filter(np.random.default_rng(0).normal(size=(64, 64, 64)), 2).astype(np.float32)
    fast_s, _ = _timed(lambda: extract_nine_views(cube, 50, 50, order=3), 10)
    reference_s, _ = _timed(lambda: reference_nine_views(cube, 50, order=3), 3)
    return {"nine_views_s": fast_s, "nine_views_reference_s": reference_s, "nine_views_speedup": reference_s / fast_s}


def _met(key: str, value: float) -> str:
    limit, sense = TARGETS[key]
    return "yes" if (value <= limit if sense == "max" else value >= limit) else "NO"


def table(results: dict[str, Any]) -> str:
    r = results
    rows = [
        ("download of the 512x512x300 study (as Slicer)", f"{r['download_s']:.3f} s", "", "", ""),
        ("first click, right after the download", f"{r['first_click_s']:.3f} s", f"{r['first_click_ratio']:.2f}",
         "<= 1.0 s", _met("first_click_s", r["first_click_s"])),
        ("  its stages load / predict / write", "/".join(f"{r['first_click_stages_s'][k]:.2f}"
                                                         for k in ("load", "predict", "write")), "", "", ""),
        ("first click, later session (on disk)", f"{r['later_session_first_click_s']:.3f} s",
         f"{r['later_session_first_click_ratio']:.2f}", "", ""),
        (f"warm click (median of {WARM_CLICKS})", f"{r['warm_click_median_s']:.3f} s", f"{r['warm_click_ratio']:.2f}",
         "<= 0.3 s", _met("warm_click_median_s", r["warm_click_median_s"])),
        ("  its stages load / predict / write", f"{r['warm_load_median_s']:.3f}/{r['warm_model_in_server_median_s']:.3f}/"
         f"{r['warm_label_write_median_s']:.3f}", "", "", ""),
        (f"model-only latency (median of {WARM_CLICKS})", f"{r['model_only_median_s']:.3f} s", "", "", ""),
        ("decode 512x512x300 gzip NIfTI", f"{r['decode_512x512x300_s']:.3f} s", f"{r['decode_512x512x300_ratio']:.2f}",
         "", ""),
        ("server overhead / model time", f"{100 * r['server_overhead_fraction']:.1f} %", "", "<= 50 %",
         _met("server_overhead_fraction", r["server_overhead_fraction"])),
        ("nine-view speedup vs rotate reference", f"{r['nine_views_speedup']:.1f} x", "", ">= 10 x",
         _met("nine_views_speedup", r["nine_views_speedup"])),
        ("server peak RSS", f"{r['server_peak_rss_mb']:.0f} MB", "", "<= 1536 MB",
         _met("server_peak_rss_mb", r["server_peak_rss_mb"])),
        ("reference workload (median)", f"{r['reference_s']:.3f} s", "1.00", "", ""),
    ]
    lines = [f"{'measure':42s} {'value':>18s} {'/ ref':>6s} {'target':>11s}  met"]
    lines += [f"{name:42s} {value:>18s} {ratio:>6s} {target:>11s}  {met}" for name, value, ratio, target, met in rows]
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # warnings and errors only
    # library chatter (progress bars, deprecation notes), here and in the servers; errors still show
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        image_id, click = make_large_ct(studies)
        results: dict[str, Any] = {"machine": "this machine's CPU", "image_shape": list(LARGE_SHAPE),
                                   "load_average_1min_at_start": os.getloadavg()[0]}
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
