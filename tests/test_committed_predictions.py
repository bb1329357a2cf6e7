"""The committed demo weights give the same predictions as when they were published.

``tests/data/committed_weight_predictions.json`` holds each bundle's predictions (class probabilities,
zero-shot features, view attention, clinical contributions) on four generated sample cases, recorded
when the weights were committed. Any change to loading, preprocessing, the networks or the ensemble
that moves a prediction by more than 1e-5 fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from oncofusion.contract import Roi
from oncofusion.io.readers import read_volume
from oncofusion.transforms.geometry import world_to_voxel
from sample_data import generate_bone, generate_lung

REPO = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((Path(__file__).parent / "data" / "committed_weight_predictions.json").read_text())
GENERATORS = {
    "lung_nodule_clip": (generate_lung.generate, {"shape": (64, 64, 48), "spacing": (1.0, 1.0, 1.5)}),
    "bone_tumor_matrix": (generate_bone.generate,
                          {"shape": (48, 48, 40), "spacing": (1.0, 1.0, 1.25), "bayes_draws": 2000}),
}


def _flatten(value, prefix=""):
    """Nested dicts of numbers -> {"a/b": number}, so every compared number is named in a failure."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}/"))
        return out
    return {prefix.rstrip("/"): value}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(REFERENCE))
def test_committed_weights_reproduce_their_recorded_predictions(bundle, tmp_path):
    generate, kwargs = GENERATORS[bundle]
    manifest = generate(tmp_path, num_cases=4, seed=0, num_folds=2, **kwargs)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(REPO / "bundles" / bundle)
    parser["device"] = torch.device("cpu")
    predictor = parser.get_parsed_content("predictor")
    for case, expected in zip(manifest["cases"], REFERENCE[bundle], strict=True):
        assert case["case_id"] == expected["case_id"] and case["center_mm"] == pytest.approx(expected["center_mm"])
        image = read_volume(tmp_path / case["image"])
        ijk = world_to_voxel(image.affine.numpy(), np.asarray([case["center_mm"]], float))[0]
        fields = {k: v for k, v in case.items() if k != "label"}
        result = predictor.predict({"image": image}, Roi(points=[tuple(ijk)]), fields).result
        if "clinical_contributions" in result:
            result["clinical_contributions"] = {k: v["log_odds"] for k, v in result["clinical_contributions"].items()}
        recorded = _flatten({k: v for k, v in expected.items() if k not in ("case_id", "center_mm")})
        actual = _flatten({k: result[k] for k in expected if k not in ("case_id", "center_mm")})
        assert actual.keys() == recorded.keys()
        for key, value in recorded.items():
            assert actual[key] == pytest.approx(value, abs=1e-5), f"{case['case_id']} {key}"
