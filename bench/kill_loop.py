"""``make stress``: kill -9 a live MONAI Label server while it stores predictions; nothing it confirmed
may be lost, and it must always start again.

A real server (``oncofusion.serving.launcher.LocalServer``) serves the lung bundle on a temporary
datastore of a few sample studies. One client sends Slicer-style clicks (``/infer`` with a
``foreground`` point; every other request also asks MONAI Label to save the label). The server is
SIGKILLed, either at a random moment, or *during a persist*: a file watcher kills it as soon as it
starts writing (it creates the hidden staging folder of an atomic write, or opens the datastore file).
It is then restarted, and every prediction whose ``/infer`` answered 200 must still be in
``/datastore/image/info``'s ``oncofusion_predictions``, and every saved label must read back whole.
A start that fails counts every prediction the datastore file no longer holds as lost.

The app keeps one prediction per (study, model), so a confirmed prediction counts as kept when it, or
a later one for the same study, is stored. Each click is unique (it is stored as ``roi_center_ijk``),
which tells which request a stored prediction came from.

    python -m bench.kill_loop --kills 10           # the app as shipped
    python -m bench.kill_loop --kills 10 --stock   # MONAI Label's stock datastore: what the bench catches

writes ``bench/results/kill_loop.json`` and exits non-zero if anything was lost or a restart failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import requests
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from oncofusion.io.atomic import STAGING_SUFFIX
from oncofusion.serving.launcher import APP_DIR, REPO_ROOT, LocalServer

MODEL = "lung_nodule_clip"
SAMPLE_MANIFEST = REPO_ROOT / "sample_data" / "lung" / "manifest.json"
RESULTS = REPO_ROOT / "bench" / "results" / "kill_loop.json"
CONFIG = "datastore_v2.json"
PREDICTIONS_KEY = "oncofusion_predictions"
LABEL_TAG = "original"  # where MONAI Label saves an /infer label asked for with save_label
REQUEST_TIMEOUT_S = 300
RANDOM_KILL_S = (0.2, 6.0)  # a random kill lands this long after the first click of a run
PERSIST_KILL_AFTER = (1, 4)  # a persist kill waits for this many clicks, then for the next write
MAX_CLICKS_PER_RUN = 200  # a run whose kill never came ends here (and is reported)

logger = logging.getLogger("bench.kill_loop")


def build_studies(folder: Path, num_studies: int) -> dict[str, list[int]]:
    """Copy the first sample studies and their sidecars; return each study's nodule click (IJK)."""
    if not SAMPLE_MANIFEST.is_file():
        raise FileNotFoundError(f"{SAMPLE_MANIFEST} is missing: run `make sample-data` first")
    cases = json.loads(SAMPLE_MANIFEST.read_text())["cases"][:num_studies]
    (folder / "sidecars").mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copy(SAMPLE_MANIFEST.parent / case["image"], folder / f"{case['case_id']}.nii.gz")
        sidecar = SAMPLE_MANIFEST.parent / "datastore" / "sidecars" / f"{case['case_id']}.json"
        if sidecar.is_file():
            shutil.copy(sidecar, folder / "sidecars" / sidecar.name)
    return {case["case_id"]: [int(v) for v in case["center_ijk"]] for case in cases}


@dataclass
class Click:
    """One ``/infer`` request: its unique click, and the answer if the server confirmed it."""

    number: int
    image: str
    point: tuple[int, int, int]
    save_label: bool
    result: dict[str, Any] | None = None


@dataclass
class Ledger:
    """Every click sent, per study in sending order, and which confirmed ones were lost."""

    centers: dict[str, list[int]]
    shapes: dict[str, tuple[int, ...]]
    clicks: dict[str, list[Click]] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)
    count: int = 0

    def next_click(self) -> Click:
        """Round-robin over the studies; the n-th click on a study is its nodule centre plus a unique
        offset within +-3 voxels (343 distinct clicks per study)."""
        image = sorted(self.centers)[self.count % len(self.centers)]
        n = len(self.clicks.get(image, []))
        offset = (n % 7 - 3, (n // 7) % 7 - 3, (n // 49) % 7 - 3)
        point = tuple(int(np.clip(c + o, 0, s - 1)) for c, o, s in
                      zip(self.centers[image], offset, self.shapes[image], strict=True))
        click = Click(self.count, image, point, save_label=self.count % 2 == 1)
        self.clicks.setdefault(image, []).append(click)
        self.count += 1
        return click

    def confirmed(self) -> list[Click]:
        return [c for clicks in self.clicks.values() for c in clicks if c.result is not None]

    def check(self, image: str, stored: dict[str, Any] | None) -> list[Click]:
        """The confirmed clicks on ``image`` that ``stored`` (its prediction after a restart) does not
        cover: stored must be the latest confirmed one, or one sent after it."""
        clicks = self.clicks.get(image, [])
        index = -1
        if stored is not None:
            point = tuple(round(v) for v in stored.get("roi_center_ijk") or ())
            index = next((i for i, c in enumerate(clicks) if c.point == point), -1)
            match = clicks[index] if index >= 0 else None
            if match is not None and match.result is not None and not _same_prediction(stored, match.result):
                index -= 1  # same click, different answer: not the confirmed one
        lost = [c for i, c in enumerate(clicks) if i > index and c.result is not None]
        self.lost.update(c.number for c in lost)
        return lost


def _same_prediction(stored: dict[str, Any], answer: dict[str, Any]) -> bool:
    keys = ("malignancy_probability", "roi_center_ijk", "latencies")
    return all(stored.get(k) == answer.get(k) for k in keys)


class KillOnWrite(FileSystemEventHandler):
    """Kill the server the moment it starts writing to the datastore, once ``armed``; ``skip`` such
    writes are let through first.

    A write starts when the staging folder of an atomic write appears, or when the datastore file is
    opened or modified in place (what the stock datastore does, and how it loses the file).
    """

    def __init__(self, pid: int, config: Path, skip: int):
        self.pid = pid
        self.config = str(config)
        self.skip = skip
        self.armed = threading.Event()
        self.fired = threading.Event()

    def _starts_a_write(self, event: FileSystemEvent) -> bool:
        name = os.path.basename(str(event.src_path))
        if event.is_directory:
            return event.event_type == "created" and name.startswith(".") and name.endswith(STAGING_SUFFIX)
        return str(event.src_path) == self.config and event.event_type in ("opened", "modified")

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not self.armed.is_set() or self.fired.is_set() or not self._starts_a_write(event):
            return
        if self.skip:
            self.skip -= 1
            return
        _kill(self.pid)
        self.fired.set()


STOCK_APP = """# the OncoFusion app with MONAI Label's stock LocalDatastore: what kill_loop --stock runs against
import importlib.util

from monailabel.interfaces.app import MONAILabelApp

_spec = importlib.util.spec_from_file_location("oncofusion_app_main", {main!r})
_main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main)


class StockDatastoreApp(_main.OncoFusionApp, MONAILabelApp):
    def init_datastore(self):
        return MONAILabelApp.init_datastore(self)
"""


class AppServer(LocalServer):
    """``LocalServer`` serving another app folder (the stock-datastore variant)."""

    def __init__(self, *args: Any, app_dir: Path | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.app_dir = app_dir

    def command(self) -> list[str]:
        command = super().command()
        if self.app_dir is not None:
            command[command.index("--app") + 1] = str(self.app_dir)
        return command


def stock_app(folder: Path) -> Path:
    """An app folder whose ``main.py`` is this repository's app with the stock datastore."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(STOCK_APP.format(main=str(APP_DIR / "main.py")))
    return folder


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ClickFailed(Exception):
    """An ``/infer`` answer other than 200 while the server was up."""


def _click(url: str, click: Click) -> dict[str, Any]:
    params = {"foreground": [list(click.point)], "save_label": click.save_label}
    response = requests.post(f"{url}/infer/{MODEL}", params={"image": click.image, "output": "json"},
                             data={"params": json.dumps(params)}, timeout=REQUEST_TIMEOUT_S)
    if response.status_code != 200:
        raise ClickFailed(f"/infer answered {response.status_code}: {response.text[:300]}")
    return response.json()


def _staging_leftovers(studies: Path) -> int:
    return sum(1 for p in studies.rglob(f".*{STAGING_SUFFIX}") if p.is_dir())


def _label_ok(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        return nib.load(path).get_fdata().shape == shape
    except Exception:  # a torn gzip or header: exactly what this bench looks for
        return False


def verify(url: str, studies: Path, ledger: Ledger) -> dict[str, Any]:
    """After a restart: every confirmed prediction (or a later one) served back; every study with a
    confirmed saved label has one, whole."""
    lost, bad_labels = 0, []
    for image in sorted(ledger.centers):
        response = requests.get(f"{url}/datastore/image/info", params={"image": image}, timeout=60)
        response.raise_for_status()
        stored = (response.json().get(PREDICTIONS_KEY) or {}).get(MODEL)
        lost += len(ledger.check(image, stored))
        label = studies / "labels" / LABEL_TAG / f"{image}.nii.gz"
        saved = any(c.save_label and c.result is not None for c in ledger.clicks.get(image, []))
        if (saved or label.exists()) and not _label_ok(label, ledger.shapes[image]):
            bad_labels.append(image)
    return {"lost": lost, "bad_labels": bad_labels}


def verify_file(studies: Path, ledger: Ledger) -> int:
    """When the server does not start: what the datastore file still holds (nothing, if it is unreadable,
    which is what a stock server refusing to start means for every stored prediction)."""
    try:
        objects = json.loads((studies / CONFIG).read_text())["objects"]
    except (OSError, ValueError, KeyError):
        objects = {}
    lost = 0
    for image in sorted(ledger.centers):
        info = (objects.get(image) or {}).get("image", {}).get("info", {})
        lost += len(ledger.check(image, (info.get(PREDICTIONS_KEY) or {}).get(MODEL)))
    return lost


def one_run(studies: Path, work_dir: Path, ledger: Ledger, mode: str | None, rng: random.Random,
            conf: dict[str, str], app_dir: Path | None = None) -> dict[str, Any]:
    """Start the server, verify what is stored, then click until ``mode`` kills it (None: no kill)."""
    started = time.time()
    with AppServer(studies, work_dir, conf, app_dir=app_dir) as server:
        run: dict[str, Any] = {"mode": mode, "start_s": round(time.time() - started, 1)}
        run.update(verify(server.url, studies, ledger))
        log = server.log_tail(10**8)
        run["repairs"] = log.count("restored datastore file") + log.count("rebuilding datastore file")
        if mode is None:
            return run
        leftovers = _staging_leftovers(studies)
        killer = KillOnWrite(server.process.pid, studies / CONFIG, skip=rng.randint(0, 2))
        observer = Observer()
        observer.schedule(killer, str(studies), recursive=True)
        observer.start()
        timer = threading.Timer(rng.uniform(*RANDOM_KILL_S), _kill, args=(server.process.pid,))
        arm_after = rng.randint(*PERSIST_KILL_AFTER)
        confirmed = clicks = 0
        try:
            while server.process.poll() is None and clicks < MAX_CLICKS_PER_RUN:
                click = ledger.next_click()
                clicks += 1
                if mode == "random" and clicks == 1:
                    timer.start()
                if mode == "persist" and clicks >= arm_after:
                    killer.armed.set()
                try:
                    click.result = _click(server.url, click)
                    confirmed += 1
                except (requests.RequestException, ClickFailed) as e:
                    if not _exits_within(server.process, 2.0):
                        raise ClickFailed(f"click {click.number} failed while the server was up: {e}") from e
            if server.process.poll() is None:
                logger.warning("no kill after %d clicks; killing now", clicks)
                _kill(server.process.pid)
        finally:
            timer.cancel()
            observer.stop()
            observer.join(timeout=10)
        server.process.wait(timeout=30)
        run.update({"confirmed": confirmed, "exit": server.process.returncode,
                    "mid_write": _staging_leftovers(studies) > leftovers})
    return run


def _exits_within(process, seconds: float) -> bool:
    try:
        process.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def kill_loop(kills: int, num_studies: int, seed: int, keep: Path | None = None,
              stock: bool = False) -> dict[str, Any]:
    rng = random.Random(seed)
    conf = {"bundles": str(REPO_ROOT / "bundles"), "models": MODEL}
    with tempfile.TemporaryDirectory(prefix="kill_loop_") as tmp:
        root = keep or Path(tmp)
        app_dir = stock_app(root / "stock_app") if stock else None
        studies = root / "studies"
        centers = build_studies(studies, num_studies)
        shapes = {image: nib.load(studies / f"{image}.nii.gz").shape for image in centers}
        ledger = Ledger(centers, shapes)
        runs: list[dict[str, Any]] = []
        failed_start = error = None
        started = time.time()
        for k in range(kills + 1):  # the last start only verifies
            mode = None if k == kills else ("persist", "random")[k % 2]
            try:
                runs.append(one_run(studies, root / f"run_{k:03d}", ledger, mode, rng, conf, app_dir))
            except RuntimeError as e:  # LocalServer: the server exited or never answered /info
                failed_start = str(e)[-2000:]
                logger.error("start %d failed: %s", k, failed_start)
                verify_file(studies, ledger)
                break
            except ClickFailed as e:
                error = str(e)
                logger.error("run %d: %s", k, error)
                break
            logger.info("run %d: %s", k, runs[-1])
        killed = [r for r in runs if r["mode"]]
        return {
            "datastore": "stock LocalDatastore" if stock else "DurableLocalDatastore",
            "kills": len(killed),
            "restarts_ok": max(len(runs) - 1, 0),
            "restarts_failed": int(failed_start is not None),
            "predictions_confirmed": len(ledger.confirmed()),
            "predictions_lost": len(ledger.lost),
            "labels_unreadable": len({image for r in runs for image in r["bad_labels"]}),
            "kills_during_persist": sum(1 for r in killed if r["mode"] == "persist"),
            # kills that left an atomic write's staging folder behind (the durable datastore's writes)
            "kills_mid_write": sum(1 for r in killed if r["mid_write"]),
            "repairs_at_start": sum(r["repairs"] for r in runs),
            "median_start_s": float(np.median([r["start_s"] for r in runs])) if runs else None,
            "duration_s": round(time.time() - started, 1),
            "studies": num_studies,
            "seed": seed,
            "first_failed_start": failed_start,
            "error": error,
            "runs": runs,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs of the server (default: 30)")
    parser.add_argument("--studies", type=int, default=3, help="sample studies in the datastore")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (logs, datastore)")
    parser.add_argument("--stock", action="store_true",
                        help="serve with MONAI Label's stock LocalDatastore: shows what the bench catches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    summary = kill_loop(args.kills, args.studies, args.seed, args.keep, args.stock)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    print(f"wrote {args.out}")
    return int(summary["predictions_lost"] > 0 or summary["restarts_failed"] > 0
               or summary["labels_unreadable"] > 0 or summary["error"] is not None)


if __name__ == "__main__":
    raise SystemExit(main())
