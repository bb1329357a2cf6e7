"""Rectal ERUS bundle: stage-1 feature throughput and box-to-prediction latency.

- **features/s**: frames per second through one fold's frozen encoder (decode, 224 x 224 bicubic, encode),
  cache off, on the SYNTHETIC sample frames; and patients per second read back from the cache.
- **latency**: a Slicer box on a SYNTHETIC ERUS frame through a live MONAI Label server (5 encoders +
  5 boosters, SHAP and the waterfall PNG included), first and warm (median), with the committed weights.

``bench_rectal()`` returns a dict for ``bench/run.py``; ``python -m bench.rectal`` prints it.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from oncofusion.serving.launcher import REPO_ROOT, LocalServer

RECTAL_BUNDLE = REPO_ROOT / "bundles" / "rectal_erus_clip"
SAMPLE = REPO_ROOT / "sample_data" / "rectal"

logger = logging.getLogger("bench.rectal")


def bench_features(num_patients: int = 20) -> dict[str, Any]:
    """Frames/s through fold 0's encoder without a cache, and patients/s from a warm cache."""
    from oncofusion.data.manifest import datalist
    from oncofusion.models.rectal_erus.features import FeatureCache, feature_table
    from oncofusion.models.rectal_erus.model import load_encoder

    records = datalist(SAMPLE / "manifest.json", keys=["report"], optional_keys=["images"],
                       path_keys=["images"])[:num_patients]
    frames = sum(len(r.get("images") or [r["image"]]) for r in records)
    encoder = load_encoder("pair", RECTAL_BUNDLE / "models", 0)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        feature_table(encoder, records, FeatureCache(tmp), progress=False)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        feature_table(encoder, records, FeatureCache(tmp), progress=False)
        warm = time.perf_counter() - start
    return {"stage1_frames_per_s": frames / cold, "stage1_patients_per_s": num_patients / cold,
            "stage1_cached_patients_per_s": num_patients / warm}


def bench_latency(warm_clicks: int = 10) -> dict[str, Any]:
    """First and warm (median of ``warm_clicks``) box-to-prediction wall time through the server."""
    import requests

    sidecar = json.loads((SAMPLE / "datastore" / "sidecars" / "rectal_0000_f0.json").read_text())
    (i0, j0), (i1, j1) = sidecar["roi"]
    box = {"roi": [i0, i1, j0, j1, 0, 0], "report": sidecar["report"]}
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        studies.mkdir()
        shutil.copy(SAMPLE / "datastore" / "rectal_0000_f0.dcm", studies / "erus.dcm")
        conf = {"bundles": str(RECTAL_BUNDLE.parent), "models": RECTAL_BUNDLE.name, "device": "cpu",
                "runs": str(Path(tmp) / "runs")}
        with LocalServer(studies, Path(tmp) / "server", conf) as server:
            requests.get(f"{server.url}/info/", timeout=300).raise_for_status()

            def click() -> dict[str, Any]:
                start = time.perf_counter()
                answer = requests.post(f"{server.url}/infer/{RECTAL_BUNDLE.name}", timeout=300,
                                       params={"image": "erus", "output": "json"},
                                       files={"params": (None, json.dumps(box))})
                answer.raise_for_status()
                return {"wall": time.perf_counter() - start, **answer.json()["latencies"]}

            first = click()
            warm = [click() for _ in range(warm_clicks)]
            rss = server.peak_rss_bytes()
    return {"first_box_s": first["wall"], "warm_box_median_s": statistics.median(c["wall"] for c in warm),
            "warm_predict_median_s": statistics.median(c["predict"] for c in warm),
            "server_peak_rss_mb": rss / 2**20}


def bench_rectal() -> dict[str, Any]:
    result = {"bundle": RECTAL_BUNDLE.name, "study": "rectal_0000_f0 (SYNTHETIC 320x320 ERUS frame)",
              **bench_features(), **bench_latency()}
    logger.info("rectal stage 1 %.1f frames/s; first box %.2f s, warm %.2f s", result["stage1_frames_per_s"],
                result["first_box_s"], result["warm_box_median_s"])
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(bench_rectal(), indent=2))
