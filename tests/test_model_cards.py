"""The committed demo weights reproduce the AUROCs their model cards state.

Each model card holds, next to the numbers its prose gives, one machine-readable line
``<!-- sample-data-auroc: {"<model>": <AUROC>, ...} -->``. Here the default sample data are generated as
``make sample-data`` generates them, the bundle's ``configs/evaluate.json`` runs out of fold with the
committed weights, and every AUROC is compared with the card's at the number of decimals the card writes.
Retrained weights pass once their card states the new numbers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import BUNDLES, REPO, run_bundle

pytestmark = pytest.mark.slow

GENERATORS = {"lung_nodule_clip": "sample_data.generate_lung", "bone_tumor_matrix": "sample_data.generate_bone",
              "thyroid_llnm": "sample_data.generate_thyroid", "rectal_erus_clip": "sample_data.generate_rectal",
              "opscc_smurf": "sample_data.generate_opscc"}
CARD_LINE = re.compile(r"<!-- sample-data-auroc: (\{.*?\}) -->")


def card_aurocs(bundle: Path) -> dict[str, Decimal]:
    """The AUROCs the model card states for the sample data, as written (``Decimal`` keeps the decimals)."""
    card = bundle / "docs" / "README.md"
    found = CARD_LINE.findall(card.read_text())
    assert len(found) == 1, (f"{card} needs exactly one line '<!-- sample-data-auroc: {{\"<model>\": <AUROC>}} -->' "
                             f"beside the metrics it states; found {len(found)}")
    return json.loads(found[0], parse_float=Decimal)


def makefile_generator(module: str, out: Path) -> list[str]:
    """The Makefile's ``$(PY) -m <module> ...`` recipe of a served sample set, variables expanded, writing to ``out``."""
    text = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*[:?]?=\s*(.*?)\s*$", text, re.M))
    # the recipe that makes a set the demo datastore serves (not e.g. a larger training set of the same generator)
    served = set(re.findall(r"^\$\(DEMO_DIR\)/\.ready:.*?$", text, re.M))
    served_dirs = set(re.findall(r"\$\((\w+)\)/manifest\.json", " ".join(served)))
    (recipe,) = [line for line in text.splitlines() if f"-m {module} " in line
                 and any(f"--out $({name})" in line for name in served_dirs)]
    args = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], recipe).split()
    args = args[args.index("-m"):]
    args[args.index("--out") + 1] = str(out)
    return args


def evaluated_aurocs(report: dict) -> dict[str, float]:
    """Each model's AUROC in an evaluation report: a comparison names its models, a single model is 'out-of-fold'."""
    if "models" in report:
        return {name: metrics["auroc"]["value"] for name, metrics in report["models"].items()}
    return {"out-of-fold": report["auroc"]["value"]}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_committed_weights_reproduce_the_model_card_aurocs(bundle: Path, tmp_path):
    stated = card_aurocs(bundle)
    assert bundle.name in GENERATORS, f"add the sample-data generator of {bundle.name} to GENERATORS"
    data = tmp_path / "sample_data"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    generated = subprocess.run([sys.executable, *makefile_generator(GENERATORS[bundle.name], data)], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=1200)
    assert generated.returncode == 0, generated.stdout[-3000:] + generated.stderr[-3000:]

    run_bundle("run", "--config_file", "['configs/inference.json','configs/evaluate.json']", "--bundle_root", ".",
               "--datalist_file", str(data / "manifest.json"), "--output_dir", str(tmp_path / "eval"), cwd=bundle,
               timeout=1200)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert "out-of-fold" in report["data"]
    measured = evaluated_aurocs(report)
    assert set(stated) == set(measured), f"the card states {sorted(stated)}, the evaluation has {sorted(measured)}"
    for name, value in stated.items():
        decimals = -value.as_tuple().exponent
        assert f"{measured[name]:.{decimals}f}" == str(value), (
            f"{bundle.name}: {name} has out-of-fold AUROC {measured[name]:.4f} with the committed weights; "
            f"its model card states {value}")
