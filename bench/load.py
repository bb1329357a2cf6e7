"""Responsiveness under load: ``/info`` latency while 32 lung clicks run at once on a live server.

Stock MONAI Label ran inference inside the event loop, so ``/info`` waited behind every click (p50 6 s,
p99 15 s during 32 concurrent requests). Target: ``/info`` p99 < 100 ms while 32 inferences run; every
inference answers 200. Results go to ``bench/results/load.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from oncofusion.serving.launcher import REPO_ROOT, LocalServer

DEMO_STUDIES = REPO_ROOT / "sample_data" / "demo"
LUNG_MANIFEST = REPO_ROOT / "sample_data" / "lung" / "manifest.json"
RESULTS = REPO_ROOT / "bench" / "results" / "load.json"
MODEL = "lung_nodule_clip"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load(concurrent: int, work_dir: Path) -> dict[str, Any]:
    cases = json.loads(LUNG_MANIFEST.read_text())["cases"][:concurrent]
    with LocalServer(DEMO_STUDIES, work_dir, {"models": MODEL}) as live:
        requests.get(f"{live.url}/info/", timeout=120)  # predictors built before timing
        statuses: list[int] = []
        infer_seconds: list[float] = []

        def click(case: dict[str, Any]) -> None:
            start = time.perf_counter()
            answer = requests.post(f"{live.url}/infer/{MODEL}", params={"image": case["case_id"], "output": "json"},
                                   files={"params": (None, json.dumps({"foreground": [case["center_ijk"]]}))},
                                   timeout=600)
            infer_seconds.append(time.perf_counter() - start)
            statuses.append(answer.status_code)

        workers = [threading.Thread(target=click, args=(case,)) for case in cases]
        for worker in workers:
            worker.start()
        info_ms: list[float] = []
        while any(w.is_alive() for w in workers):
            start = time.perf_counter()
            requests.get(f"{live.url}/info/", timeout=60).raise_for_status()
            info_ms.append(1000 * (time.perf_counter() - start))
            time.sleep(0.05)
        for worker in workers:
            worker.join()
    return {
        "concurrent_inferences": concurrent,
        "inference_status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "inference_wall_s": {"p50": round(statistics.median(infer_seconds), 2),
                             "max": round(max(infer_seconds), 2)},
        "info_samples": len(info_ms),
        "info_ms": {"p50": round(statistics.median(info_ms), 1), "p99": round(_percentile(info_ms, 0.99), 1),
                    "max": round(max(info_ms), 1)},
        "target_info_p99_ms": 100,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrent", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = run_load(args.concurrent, Path(work))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
