"""Thyroid bundle latency through a live MONAI Label server on real ultrasound DICOM files
(``sample_data/real_ultrasound.py``): the first click on a study (DICOM decode + predict + attention
overlay), warm clicks on it, and the first click on a 120-frame cine (every frame decoded to find the
sharpest). The committed demo weights are used.

``bench_thyroid()`` returns a dict for ``bench/run.py``; ``python -m bench.thyroid`` prints it.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from oncofusion.serving.launcher import REPO_ROOT, LocalServer
from sample_data.real_ultrasound import link_into

THYROID_BUNDLE = REPO_ROOT / "bundles" / "thyroid_llnm"
FORM = {"report": "Solid hypoechoic nodule with irregular margin.", "age": 45, "sex": "female"}
#: a Slicer box [i0, i1, j0, j1, k0, k1] on the palette study, and a click on the cine
BOX = [260, 340, 170, 250, 0, 0]
CINE_CLICK = [[320, 240]]

logger = logging.getLogger("bench.thyroid")


def bench_thyroid(warm_clicks: int = 10) -> dict[str, Any]:
    """First and warm (median of ``warm_clicks``) box-to-prediction wall time, and a cine's first click."""
    import requests

    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        link_into(studies)
        conf = {"bundles": str(THYROID_BUNDLE.parent), "models": THYROID_BUNDLE.name, "device": "cpu",
                "runs": str(Path(tmp) / "runs")}
        with LocalServer(studies, Path(tmp) / "server", conf) as server:
            requests.get(f"{server.url}/info/", timeout=300).raise_for_status()  # builds the model

            def click(image: str, prompt: dict[str, Any]) -> dict[str, Any]:
                start = time.perf_counter()
                answer = requests.post(f"{server.url}/infer/{THYROID_BUNDLE.name}", timeout=300,
                                       params={"image": image, "output": "json"},
                                       files={"params": (None, json.dumps({**prompt, **FORM}))})
                answer.raise_for_status()
                return {"wall": time.perf_counter() - start, **answer.json()["latencies"]}

            first = click("us_real_palette", {"roi": BOX})
            warm = [click("us_real_palette", {"roi": BOX}) for _ in range(warm_clicks)]
            cine = click("us_real_cine", {"foreground": CINE_CLICK})
            rss = server.peak_rss_bytes()
    result = {
        "bundle": THYROID_BUNDLE.name,
        "study": "us_real_palette (OBXXXX1A.dcm, 800x600 palette colour)",
        "first_click_s": first["wall"],
        "first_click_decode_s": first["load"],
        "warm_click_median_s": statistics.median(c["wall"] for c in warm),
        "warm_predict_median_s": statistics.median(c["predict"] for c in warm),
        "cine_first_click_s": cine["wall"],
        "cine_decode_s": cine["load"],
        "server_peak_rss_mb": rss / 2**20,
    }
    logger.info("thyroid first click %.2f s, warm %.2f s, cine first click %.2f s", result["first_click_s"],
                result["warm_click_median_s"], result["cine_first_click_s"])
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(bench_thyroid(), indent=2))
