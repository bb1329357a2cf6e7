"""Bone tumor bundle latency: the fold ensemble on one case's network inputs (model only), and the whole
predictor call (crop, ensemble, Grad-CAM, clinical integrated gradients, label on the image grid).

``bench_bone()`` returns a dict for ``bench/run.py``; ``python -m bench.bone`` prints it.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BONE_BUNDLE = REPO_ROOT / "bundles" / "bone_tumor_matrix"
BONE_MANIFEST = REPO_ROOT / "sample_data" / "bone" / "manifest.json"

logger = logging.getLogger("bench.bone")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_bone(repeats: int = 10, case_index: int = 0, bundle_dir: Path = BONE_BUNDLE,
               manifest: Path = BONE_MANIFEST, threads: int = 1) -> dict[str, Any]:
    """Median over ``repeats`` of the model-only latency (all fold models, one case) and of a full predict.

    Needs the demo weights (``make demo-weights``) and the sample data (``make sample-data``).
    """
    import torch
    from monai.bundle import ConfigParser

    from oncofusion.contract import Roi
    from oncofusion.io.readers import read_volume
    from oncofusion.transforms.geometry import voxel_to_world

    torch.set_num_threads(threads)  # as the server runs inference on the shared CPU
    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_dir)
    parser["device"] = torch.device("cpu")
    predictor = parser.get_parsed_content("predictor")
    case = json.loads(Path(manifest).read_text())["cases"][case_index]
    image = read_volume(Path(manifest).parent / case["image"])
    fields = {name: case.get(name) for name in predictor.schema.names}
    roi = Roi(points=[tuple(case["center_ijk"])])
    center_mm = voxel_to_world(image.affine.numpy(), [case["center_ijk"]])[0]
    patch, _ = predictor.patch(image, center_mm)
    clinical = torch.from_numpy(predictor.schema.encode(predictor.clinical_values(fields)))[None]
    inputs = (patch, clinical) if predictor.fusion else (patch,)
    members = predictor.ensemble.members()

    def model_only() -> None:
        predictor.ensemble(*inputs)  # every fold model, mean probability

    model_only()  # warm-up
    predictor.predict({"image": image}, roi, fields)
    result = {
        "bundle": bundle_dir.name,
        "case": case["case_id"],
        "image_shape": list(image.shape[1:]),
        "network_input_shape": list(patch.shape),
        "num_fold_models": len(members),
        "torch_threads": threads,
        "repeats": repeats,
        "model_only_median_s": _median_time(model_only, repeats),
        "predict_with_explanation_median_s": _median_time(lambda: predictor.predict({"image": image}, roi, fields), repeats),
    }
    logger.info("bone model-only %.4f s, full predict %.3f s (median of %d)", result["model_only_median_s"],
                result["predict_with_explanation_median_s"], repeats)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(bench_bone(), indent=2))
