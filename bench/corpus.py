"""The hostile-request corpus of ``tests/test_server_hardening.py`` against a live server, as figures.

Counts server errors (5xx), answers that differ from the expected status, requests that changed any
file under the server's folders (datastore, bundles, the folder beside them), and uploads left in the
temp folder. Target: all four zero. Results go to ``bench/results/corpus.json``.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from oncofusion.serving.launcher import REPO_ROOT, LocalServer
from tests.serving_fakes import make_datastore, make_fake_bundle
from tests.test_server_hardening import (
    CASES,
    MAX_PARAMS_KB,
    MAX_UPLOAD_MB,
    REAL_BUNDLES,
    _snapshot,
    _uploads_in_tmp,
)

RESULTS = REPO_ROOT / "bench" / "results" / "corpus.json"


def run_corpus(root: Path) -> dict[str, Any]:
    bundles = root / "bundles"
    make_fake_bundle(bundles, "fake_nodule")
    for name in REAL_BUNDLES:
        (bundles / name).symlink_to(REPO_ROOT / "bundles" / name, target_is_directory=True)
    studies = make_datastore(root / "datastore")
    (root / "outside").mkdir()
    conf = {"bundles": str(bundles), "runs": str(root / "runs"), "max_upload_mb": str(MAX_UPLOAD_MB),
            "max_params_kb": str(MAX_PARAMS_KB)}
    statuses: Counter[int] = Counter()
    unexpected, changed, leaked = [], [], []
    with LocalServer(studies, root, conf) as live:
        for case in CASES:
            before, uploads = _snapshot(root), _uploads_in_tmp()
            answer = case.send(live.url)
            statuses[answer.status_code] += 1
            if answer.status_code != case.status:
                unexpected.append(f"{case.name}: {answer.status_code} (expected {case.status})")
            if _snapshot(root) != before:
                changed.append(case.name)
            if _uploads_in_tmp() - uploads:
                leaked.append(case.name)
    return {
        "cases": len(CASES),
        "models": sorted({c.path.split("/")[2] for c in CASES if c.path.startswith("/infer/")}),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(v for k, v in statuses.items() if k >= 500),
        "unexpected_status": unexpected,
        "requests_that_changed_files": changed,
        "uploads_left_in_tmp": leaked,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        result = run_corpus(Path(work))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
