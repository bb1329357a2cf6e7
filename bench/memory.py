"""Server memory over many requests: the RSS of a live server, sampled every few requests of a lung +
bone mix (optionally with uploads).

Bone requests grew the server from 1.4 to 3.8 GB over 200 requests (Grad-CAM hooks and their autograd
graphs left on the served models: see ``tests/test_bone_memory.py``), and uploads were kept in the image
cache under their unique temporary names. Target: a flat curve, a slope near 0 MB per 100 requests once
the predictors are built. Results go to ``bench/results/memory.json``.

``python -m bench.memory --requests 100`` (needs ``make sample-data`` and the committed demo weights).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests

from oncofusion.serving.launcher import REPO_ROOT, LocalServer

RESULTS = REPO_ROOT / "bench" / "results" / "memory.json"
SAMPLES = {"lung_nodule_clip": REPO_ROOT / "sample_data" / "lung", "bone_tumor_matrix": REPO_ROOT / "sample_data" / "bone"}
#: requests answered before the slope is fitted: the first call of each model builds its predictor
WARMUP_REQUESTS = 10


def _cases(sample_dir: Path, count: int) -> list[dict[str, Any]]:
    manifest = sample_dir / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"{manifest} is missing: run `make sample-data` first")
    return json.loads(manifest.read_text())["cases"][:count]


def make_studies(root: Path, cases_per_model: int, models: list[str]) -> tuple[Path, list[tuple[str, dict[str, Any]]]]:
    """A datastore of links to a few sample studies per model (the demo's layout, written nowhere in
    the repository), and the (model, case) pairs to request in turn, alternating the models."""
    studies = root / "studies"
    (studies / "sidecars").mkdir(parents=True)
    per_model: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for model in models:
        sample_dir = SAMPLES[model]
        for case in _cases(sample_dir, cases_per_model):
            name = case["case_id"]
            (studies / f"{name}.nii.gz").symlink_to(sample_dir / "datastore" / f"{name}.nii.gz")
            (studies / "sidecars" / f"{name}.json").symlink_to(sample_dir / "datastore" / "sidecars" / f"{name}.json")
            per_model.setdefault(model, []).append((model, case))
    mixed = [pair for pairs in zip(*per_model.values(), strict=False) for pair in pairs]
    return studies, mixed


def _request(url: str, model: str, case: dict[str, Any], upload: bool, sample_dir: Path) -> int:
    """One click on the study's lesion; an upload sends the file and the sidecar's fields itself."""
    params: dict[str, Any] = {"foreground": [case["center_ijk"]]}
    query = {"output": "json"}
    files: dict[str, Any] = {}
    if upload:
        sidecar = json.loads((sample_dir / "datastore" / "sidecars" / f"{case['case_id']}.json").read_text())
        params.update({k: sidecar[k] for k in ("sex", "age", "location", "fracture") if k in sidecar})
        files["file"] = ("study.nii.gz", (sample_dir / "datastore" / f"{case['case_id']}.nii.gz").read_bytes())
    else:
        query["image"] = case["case_id"]
    files["params"] = (None, json.dumps(params))
    return requests.post(f"{url}/infer/{model}", params=query, files=files, timeout=600).status_code


def slope_mb_per_100(samples: list[dict[str, float]], from_request: int) -> float | None:
    """Least-squares slope of RSS (MB) against the request count, per 100 requests, after warm-up."""
    points = [(s["requests"], s["rss_mb"]) for s in samples if s["requests"] >= from_request]
    if len(points) < 2:
        return None
    x, y = np.asarray(points, dtype=float).T
    return round(float(np.polyfit(x, y, 1)[0]) * 100, 1)


def run_memory(total: int, every: int, upload_every: int, work_dir: Path, models: list[str] | None = None,
               cases_per_model: int = 4) -> dict[str, Any]:
    """``total`` requests alternating the ``models``' clicks (default: lung and bone); RSS of the server
    process every ``every`` requests."""
    models = list(models or SAMPLES)
    studies, mixed = make_studies(work_dir, cases_per_model, models)
    conf = {"models": ",".join(models), "device": "cpu", "runs": str(work_dir / "runs")}
    statuses: Counter[int] = Counter()
    kinds: Counter[str] = Counter()
    samples: list[dict[str, float]] = []
    start = time.time()
    with LocalServer(studies, work_dir, conf) as live:
        process = psutil.Process(live.process.pid)
        requests.get(f"{live.url}/info/", timeout=600).raise_for_status()  # builds every predictor

        def sample(count: int) -> None:
            samples.append({"requests": count, "rss_mb": round(process.memory_info().rss / 2**20, 1),
                            "elapsed_s": round(time.time() - start, 1)})

        sample(0)
        for i in range(total):
            model, case = mixed[i % len(mixed)]
            upload = upload_every > 0 and (i + 1) % upload_every == 0
            statuses[_request(live.url, model, case, upload, SAMPLES[model])] += 1
            kinds[f"{model}{' upload' if upload else ''}"] += 1
            if (i + 1) % every == 0 or i + 1 == total:
                sample(i + 1)
        peak = live.peak_rss_bytes() / 2**20
    rss = [s["rss_mb"] for s in samples]
    return {
        "requests": total,
        "models": models,
        "sample_every": every,
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
        "request_counts": dict(sorted(kinds.items())),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "samples": samples,
        "rss_mb": rss,
        "first_rss_mb": rss[0],
        "last_rss_mb": rss[-1],
        "peak_rss_mb": round(peak, 1),
        "slope_from_request": WARMUP_REQUESTS,
        "slope_mb_per_100_requests": slope_mb_per_100(samples, WARMUP_REQUESTS),
        "wall_s": round(time.time() - start, 1),
        "device": "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100, help="requests to send (default 100)")
    parser.add_argument("--every", type=int, default=10, help="sample the RSS every k requests (default 10)")
    parser.add_argument("--upload-every", type=int, default=0,
                        help="send every k-th request as an upload of the study (default 0: none)")
    parser.add_argument("--models", default=",".join(SAMPLES),
                        help=f"comma list of the models to alternate (default {','.join(SAMPLES)})")
    parser.add_argument("--label", default="", help="a note stored with the result, e.g. 'before fix'")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"result file (default {RESULTS})")
    args = parser.parse_args()
    if args.requests < 1 or args.every < 1:
        parser.error("--requests and --every must be at least 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(SAMPLES))
    if unknown or not models:
        parser.error(f"--models: unknown {unknown or 'none given'}; choose from {', '.join(SAMPLES)}")
    with tempfile.TemporaryDirectory() as work:
        result = run_memory(args.requests, args.every, args.upload_every, Path(work), models)
    if args.label:
        result["label"] = args.label
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
