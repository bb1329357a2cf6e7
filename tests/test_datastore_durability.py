"""Nothing the datastore stores is lost on a crash: repair at start-up, and a kill -9 loop.

The kill loop runs its writers in child processes forked from one "zygote" child (started with
``sys.executable``): importing MONAI Label takes 10-20 s here, far too long to pay once per kill.
Run this file as ``python -m tests.test_datastore_durability zygote`` to get that child.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel.datastore.local import LocalDatastore

from oncofusion.serving.datastore import DurableLocalDatastore, backup_path, is_loadable

REPO = Path(__file__).resolve().parents[1]
CONFIG = "datastore_v2.json"
IMAGES = ("case_a", "case_b", "case_c")
KEY = "oncofusion_predictions"  # where the app keeps predictions (oncofusion.serving.infer_task)
SLOTS = 4  # models per image: each update overwrites one (image, model) record, as the app does
# MONAI Label's default MONAI_LABEL_DATASTORE_FILE_EXT
ALL_EXTENSIONS = ["*.nii.gz", "*.nii", "*.nrrd", "*.jpg", "*.png", "*.tif", "*.svs", "*.xml"]


def make_studies(folder: Path) -> Path:
    """Three tiny NIfTI studies."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(IMAGES):
        volume = np.full((4, 4, 3), i, dtype=np.int16)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / f"{name}.nii.gz")
    return folder


def record(seq: int) -> tuple[str, str, dict]:
    """The ``seq``-th prediction: which image, which model, and its JSON."""
    return IMAGES[seq % len(IMAGES)], f"model{seq % SLOTS}", {"seq": seq, "probability": (seq % 97) / 97,
                                                              "scores": [seq / 7.0] * 40}


def store(ds, seq: int) -> None:
    """Read, merge, write: what the app's infer task does after each prediction."""
    image, model, result = record(seq)
    stored = ds.get_image_info(image).get(KEY) or {}
    ds.update_image_info(image, {KEY: {**stored, model: result}})


def missing(ds, committed: list[int]) -> list[int]:
    """Committed updates the datastore does not hold (a later update of the same record may replace one)."""
    lost = []
    for seq in committed:
        image, model, _ = record(seq)
        kept = (ds.get_image_info(image).get(KEY) or {}).get(model)
        if not kept or kept["seq"] < seq:
            lost.append(seq)
    return lost


@pytest.fixture()
def studies(tmp_path) -> Path:
    return make_studies(tmp_path / "studies")


# -- repair at start-up ------------------------------------------------------------------------------
def _two_predictions(studies: Path) -> None:
    ds = DurableLocalDatastore(str(studies))
    store(ds, 0)
    store(ds, 1)  # the file now holds 0 and 1; its backup holds 0


CORRUPTIONS = {
    "empty": lambda text: "",
    "truncated": lambda text: text[: len(text) // 2],
    "not_json": lambda text: "\x00\x00garbage",
    "json_but_not_a_datastore": lambda text: '{"objects": []}',
    "blank": lambda text: "\n  \n",
}


def test_each_write_keeps_the_previous_file_as_backup(studies):
    ds = DurableLocalDatastore(str(studies))
    store(ds, 0)
    store(ds, 1)
    config, backup = studies / CONFIG, backup_path(studies / CONFIG)
    assert missing(DurableLocalDatastore(str(studies)), [0, 1]) == []
    saved = json.loads(backup.read_text())["objects"]
    assert saved[IMAGES[0]]["image"]["info"][KEY]["model0"]["seq"] == 0
    assert KEY not in saved[IMAGES[1]]["image"]["info"]  # one write behind
    assert is_loadable(config) and is_loadable(backup)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_bad_file_is_restored_from_backup_and_kept_aside(studies, caplog, corruption):
    _two_predictions(studies)
    config = studies / CONFIG
    bad = CORRUPTIONS[corruption](config.read_text())
    config.write_text(bad)

    with caplog.at_level(logging.WARNING, logger="oncofusion.serving.datastore"):
        ds = DurableLocalDatastore(str(studies))
    assert missing(ds, [0]) == []  # the prediction stored before the last write is back
    assert sorted(ds.list_images()) == list(IMAGES)
    assert is_loadable(config)
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(config) in warnings and "restored" in warnings
    aside = list(studies.glob(f"{CONFIG}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == bad


def test_stock_refuses_to_start_on_an_empty_file(studies):
    """The defect this module fixes: a kill between truncate and write leaves this, and stock stops."""
    _two_predictions(studies)
    (studies / CONFIG).write_text("")
    with pytest.raises(ValueError, match="EOF"):
        LocalDatastore(str(studies))


def test_missing_file_with_a_backup_is_restored(studies, caplog):
    _two_predictions(studies)
    (studies / CONFIG).unlink()
    with caplog.at_level(logging.WARNING, logger="oncofusion.serving.datastore"):
        ds = DurableLocalDatastore(str(studies))
    assert missing(ds, [0]) == []
    assert "restored" in caplog.text
    assert not list(studies.glob("*.corrupt-*"))


def test_without_a_good_backup_the_folder_is_relisted(studies, caplog):
    _two_predictions(studies)
    (studies / CONFIG).write_text("")
    backup_path(studies / CONFIG).write_text("{")
    with caplog.at_level(logging.WARNING, logger="oncofusion.serving.datastore"):
        ds = DurableLocalDatastore(str(studies))
    assert sorted(ds.list_images()) == list(IMAGES)  # the studies are served again, their info is gone
    assert missing(ds, [0]) == [0]
    assert "no valid backup" in caplog.text and "rebuilding" in caplog.text
    assert is_loadable(studies / CONFIG)


def test_a_new_folder_starts_silently(studies, caplog):
    with caplog.at_level(logging.WARNING, logger="oncofusion.serving.datastore"):
        ds = DurableLocalDatastore(str(studies))
    assert sorted(ds.list_images()) == list(IMAGES)
    assert [r for r in caplog.records if r.name == "oncofusion.serving.datastore"] == []
    assert not list(studies.glob("*.corrupt-*"))


def test_a_bad_file_written_while_running_never_replaces_the_backup(studies):
    ds = DurableLocalDatastore(str(studies))
    store(ds, 0)
    store(ds, 1)
    good_backup = backup_path(studies / CONFIG).read_text()
    (studies / CONFIG).write_text("{ half")  # someone else's in-place write, cut short
    store(ds, 2)
    assert backup_path(studies / CONFIG).read_text() == good_backup
    assert missing(DurableLocalDatastore(str(studies)), [0, 1, 2]) == []


def test_backup_is_copied_where_hard_links_are_not_supported(studies, monkeypatch):
    ds = DurableLocalDatastore(str(studies))
    store(ds, 0)

    def no_links(src, dst, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store(ds, 1)
    assert json.loads(backup_path(studies / CONFIG).read_text())["objects"][IMAGES[0]]["image"]["info"][KEY]
    assert sorted(os.listdir(studies)) == sorted([CONFIG, f"{CONFIG}.bak", ".lock", "labels",
                                                  *(f"{i}.nii.gz" for i in IMAGES)])


# -- images and labels -------------------------------------------------------------------------------
def _label(path: Path, value: int) -> Path:
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), value, dtype=np.uint8), np.eye(4)), path)
    return path


def test_labels_and_images_are_stored_whole(studies, tmp_path):
    ds = DurableLocalDatastore(str(studies))
    label_id = ds.save_label(IMAGES[0], str(_label(tmp_path / "l1.nii.gz", 1)), "final", {"model": "m"})
    assert label_id == IMAGES[0]
    uri = Path(ds.get_label_uri(IMAGES[0], "final"))
    assert uri == studies / "labels" / "final" / f"{IMAGES[0]}.nii.gz"
    assert np.asarray(nib.load(uri).dataobj).max() == 1
    assert ds.get_label_info(IMAGES[0], "final")["name"] == f"{IMAGES[0]}.nii.gz"

    new_id = ds.add_image("case_new", str(_label(tmp_path / "image.nii.gz", 7)), {"source": "test"})
    assert new_id == "case_new"
    assert np.asarray(nib.load(ds.get_image_uri("case_new")).dataobj).max() == 7
    reopened = DurableLocalDatastore(str(studies))
    assert reopened.get_image_info("case_new")["source"] == "test"
    assert reopened.get_label_info(IMAGES[0], "final")["model"] == "m"


def test_a_label_copy_that_fails_midway_leaves_the_previous_label(studies, tmp_path, monkeypatch):
    ds = DurableLocalDatastore(str(studies))
    ds.save_label(IMAGES[0], str(_label(tmp_path / "l1.nii.gz", 1)), "final", {})
    uri = Path(ds.get_label_uri(IMAGES[0], "final"))
    before = uri.read_bytes()

    def crash(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)  # the copy's bytes are written, not yet synced
    with pytest.raises(OSError, match="No space"):
        ds.save_label(IMAGES[0], str(_label(tmp_path / "l2.nii.gz", 2)), "final", {})
    assert uri.read_bytes() == before
    assert sorted(os.listdir(uri.parent)) == [uri.name]


def test_backups_leftovers_and_forensics_are_never_listed_as_studies(studies):
    ds = DurableLocalDatastore(str(studies), extensions=ALL_EXTENSIONS)
    store(ds, 0)
    store(ds, 1)
    (studies / f"{CONFIG}.corrupt-20250101T000000000000Z").write_text("")
    for folder in (studies, studies / "labels" / "final"):  # what a kill mid-copy leaves behind
        leftover = folder / ".case_x.nii.gz.abcd1234.tmp"
        leftover.mkdir()
        _label(leftover / "case_x.nii.gz", 1)
    reopened = DurableLocalDatastore(str(studies), extensions=ALL_EXTENSIONS)
    assert sorted(reopened.list_images()) == list(IMAGES)
    assert reopened.get_labeled_images() == []
    assert reopened.status()["label_tags"] == {}


def test_a_watching_datastore_reloads_a_file_replaced_by_another_process(studies):
    watcher = DurableLocalDatastore(str(studies), auto_reload=True)
    try:
        writer = DurableLocalDatastore(str(studies))
        store(writer, 5)
        deadline = time.time() + 10
        while missing(watcher, [5]) and time.time() < deadline:
            time.sleep(0.05)
        assert missing(watcher, [5]) == []
    finally:
        watcher._observer.stop()
        watcher._observer.join(timeout=5)


# -- kill -9 loop ------------------------------------------------------------------------------------
MODES = ("random", "serialize", "sync")  # when to kill: any time / while serialising / at an fsync
HOOKS = {"serialize": (json, "dumps"), "sync": (os, "fsync")}
WINDOW_RANGE = {"serialize": 8, "sync": 24}  # the n-th such call after start-up is where the kill lands
PAUSE_S = 5.0  # a writer stopped at its kill point waits this long: far longer than the parent needs


def _say(message: str) -> None:
    os.write(1, f"{message}\n".encode())  # one write per line: lines of forked writers never interleave


def _pause_at(module, name: str, n: int, armed: list[bool]) -> None:
    """Make the ``n``-th call of ``module.name`` (once ``armed``) announce itself and stall, to be killed."""
    real = getattr(module, name)
    calls = [0]

    def hooked(*args, **kwargs):
        if armed[0]:
            calls[0] += 1
            if calls[0] == n:
                _say("WINDOW")
                time.sleep(PAUSE_S)
        return real(*args, **kwargs)

    setattr(module, name, hooked)


def _writer(kind: str, folder: str, mode: str, n: int, start: int) -> None:
    armed = [False]
    if mode in HOOKS:
        _pause_at(*HOOKS[mode], n, armed)
    ds = (DurableLocalDatastore if kind == "durable" else LocalDatastore)(folder)
    armed[0] = True
    _say("OPEN")
    for seq in range(start, start + 100_000):
        store(ds, seq)
        _say(f"COMMITTED {seq}")


def zygote() -> None:
    """Fork one writer per ``kind folder mode n start`` line on stdin; report its pid and its end."""
    _say("ZYGOTE")
    for line in sys.stdin:
        kind, folder, mode, n, start = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                _writer(kind, folder, mode, int(n), int(start))
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
                _say(f"ERROR {type(e).__name__}: {e}")
            finally:
                os._exit(0)
        _say(f"WORKER {pid}")
        os.waitpid(pid, 0)
        _say(f"EXIT {pid}")


class Zygote:
    """The parent's side: start writers, read their lines, kill them."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "tests.test_datastore_durability", "zygote"],
                                        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.worker: int | None = None
        threading.Thread(target=self._read, daemon=True).start()
        assert self._next(120) == "ZYGOTE"

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def _next(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def kill_one(self, kind: str, folder: Path, mode: str, rng: random.Random, start: int) -> dict:
        """Run one writer and SIGKILL it: at a random time, or at its n-th serialisation / fsync."""
        n = rng.randint(1, WINDOW_RANGE.get(mode, 1))
        delay = rng.uniform(0.005, 0.25)
        self.process.stdin.write(f"{kind} {folder} {mode} {n} {start}\n")
        pid = opened = killed = None
        committed: list[int] = []
        last = ""
        deadline = time.time() + 60
        while True:
            line = self._next(0.002)
            if line is not None:
                word = line.split()[0]
                assert word != "ERROR", line
                if word == "WORKER":
                    pid = self.worker = int(line.split()[1])
                elif word == "OPEN":
                    opened = time.time()
                elif word == "COMMITTED":
                    committed.append(int(line.split()[1]))
                elif word == "EXIT":
                    self.worker = None
                    break
                last = word
            due = opened and (last == "WINDOW" if mode in HOOKS else time.time() > opened + delay)
            if pid and not killed and (due or time.time() > (opened or time.time()) + 10):
                os.kill(pid, signal.SIGKILL)
                killed = last
            assert time.time() < deadline, "writer neither killed nor ended"
        return {"committed": committed, "in_window": killed == "WINDOW"}

    def close(self) -> None:
        """Stop a writer a failed test left running, then the zygote."""
        if self.worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker, signal.SIGKILL)
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote_process():
    z = Zygote()
    yield z
    z.close()


def _check_durable(folder: Path, committed: list[int]) -> None:
    config = folder / CONFIG
    assert is_loadable(config), "the datastore file was left unloadable"
    assert not list(folder.glob("*.corrupt-*")), "a repair was needed"
    ds = DurableLocalDatastore(str(folder))
    assert sorted(ds.list_images()) == list(IMAGES)
    assert missing(ds, committed) == []


def kill_loop(z: Zygote, kind: str, folder: Path, kills: int, seed: int) -> dict:
    """Kill ``kills`` writers in turn; after each, check the folder. Stops early if the file is broken."""
    rng = random.Random(seed)
    committed: list[int] = []
    targeted = broken = 0
    for k in range(kills):
        mode = MODES[k % len(MODES)]
        run = z.kill_one(kind, folder, mode, rng, start=max(committed, default=-1) + 1)
        committed += run["committed"]
        targeted += run["in_window"]
        if kind == "durable":
            _check_durable(folder, committed)
        elif not is_loadable(folder / CONFIG):
            broken += 1
            break
    return {"committed": len(committed), "in_window": targeted, "broken": broken, "kills": k + 1}


@pytest.mark.slow
def test_durable_datastore_loses_nothing_under_kill_9(zygote_process, tmp_path):
    folder = make_studies(tmp_path / "studies")
    DurableLocalDatastore(str(folder))
    result = kill_loop(zygote_process, "durable", folder, kills=30, seed=0)
    assert result["kills"] == 30 and result["broken"] == 0
    assert result["in_window"] >= 15, result  # most targeted kills landed mid-write, as planned
    assert result["committed"] >= 30, result  # the loop did store things


@pytest.mark.slow
def test_stock_datastore_fails_the_same_loop(zygote_process, tmp_path):
    folder = make_studies(tmp_path / "studies")
    LocalDatastore(str(folder))
    result = kill_loop(zygote_process, "stock", folder, kills=30, seed=0)
    assert result["broken"] == 1, result
    with pytest.raises(ValueError):
        LocalDatastore(str(folder))  # and it would not start any more


if __name__ == "__main__" and sys.argv[1:] == ["zygote"]:
    zygote()
