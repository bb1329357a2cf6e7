"""Checks every bundle under bundles/ must pass, whatever its model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import BUNDLES, SCHEMA, run_bundle

pytestmark = pytest.mark.slow


def test_every_model_is_a_bundle_with_the_standard_configs():
    assert {b.name for b in BUNDLES} >= {"lung_nodule_clip", "bone_tumor_matrix"}
    for bundle in BUNDLES:
        for name in ("metadata.json", "inference.json", "train.json", "evaluate.json", "multi_gpu_train.json"):
            assert (bundle / "configs" / name).is_file(), f"{bundle.name} lacks configs/{name}"
        assert (bundle / "docs" / "README.md").is_file(), f"{bundle.name} lacks its model card"


@pytest.mark.skipif(not SCHEMA.is_file(), reason="the shared bundle schema is not beside the repository")
@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_metadata_verifies_against_the_bundle_schema(bundle: Path, tmp_path):
    schema_copy = tmp_path / "schema.json"
    schema_copy.write_text(SCHEMA.read_text())
    result = run_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema_copy),
                        cwd=bundle)
    assert "metadata is verified with no error" in result.stdout + result.stderr
