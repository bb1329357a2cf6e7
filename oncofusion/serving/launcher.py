"""Start and stop a real MONAI Label server, and an Orthanc PACS, on loopback: for the live-server tests,
the benchmarks and ``make demo-pacs``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_DIR = REPO_ROOT / "apps" / "oncofusion"
ORTHANC_CONFIG = APP_DIR / "orthanc" / "orthanc.json"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``monailabel start_server`` for this repository's app as a subprocess, bound to 127.0.0.1.

    Use as a context manager; ``conf`` becomes ``--conf key value`` pairs, ``env`` is added to the
    environment (e.g. ``MONAI_LABEL_AUTH_ENABLE``). Waits (bounded) until
    ``/info/`` answers and always stops the server and its children on exit.
    """

    def __init__(self, studies: str | Path, work_dir: str | Path, conf: dict[str, str] | None = None,
                 start_timeout_s: float = 180.0, env: dict[str, str] | None = None, port: int | None = None):
        # a DICOMweb address stays a string: as a Path its '//' would collapse into a local folder name
        self.studies = str(studies) if str(studies).startswith(("http://", "https://")) else Path(studies)
        self.work_dir = Path(work_dir)
        self.conf = dict(conf or {})
        self.start_timeout_s = start_timeout_s
        self.env = dict(env or {})
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.work_dir / "server.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        conf = [arg for key, value in self.conf.items() for arg in ("--conf", key, str(value))]
        return [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR),
                "--studies", str(self.studies), *conf, "--host", "127.0.0.1", "--port", str(self.port)]

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.is_file() else ""

    def __enter__(self) -> LocalServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **self.env, "PYTHONPATH": path}, cwd=self.work_dir)
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_until_up(self) -> None:
        deadline = time.time() + self.start_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/info/", timeout=5) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):  # up, with authentication on
                    return
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server not up after {self.start_timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def peak_rss_bytes(self) -> int:
        """High-water mark of the server process's resident memory (Linux VmHWM)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def stop(self) -> None:
        """Terminate the server and whatever it spawned (train subprocesses), with bounded waits."""
        if self.process is None:
            return
        try:
            family = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        for p in [*family, self.process]:
            try:
                p.terminate()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        _, alive = psutil.wait_procs(family, timeout=10)
        for p in alive:
            p.kill()
        self._log.close()
        self.process = None


class LocalOrthanc:
    """Orthanc with its DICOMweb plugin as a subprocess, from ``apps/oncofusion/orthanc/orthanc.json``:
    HTTP on 127.0.0.1 only (remote access off), the DICOM port off, storage under ``work_dir``.

    Needs Debian's ``orthanc`` and ``orthanc-dicomweb`` packages. ``dicomweb_url`` is what MONAI Label's
    ``--studies`` takes; :meth:`upload` stores DICOM files through the REST API.
    """

    def __init__(self, work_dir: str | Path, port: int | None = None, start_timeout_s: float = 60.0):
        self.work_dir = Path(work_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    @staticmethod
    def executable() -> str | None:
        """The Orthanc binary, or None when the Debian package is not installed."""
        return shutil.which("Orthanc")

    def config(self) -> dict:
        config = json.loads(ORTHANC_CONFIG.read_text())
        storage = str(self.work_dir / "storage")
        config.update({"HttpPort": self.port, "StorageDirectory": storage, "IndexDirectory": storage})
        return config

    def __enter__(self) -> LocalOrthanc:
        binary = self.executable()
        if binary is None:
            raise RuntimeError("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.work_dir / "orthanc.json"
        config_file.write_text(json.dumps(self.config(), indent=2))
        self._log = open(self.work_dir / "orthanc.log", "w")
        self.process = subprocess.Popen([binary, str(config_file)], stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=self.work_dir)
        deadline = time.time() + self.start_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: see {self.work_dir}/orthanc.log")
            try:
                with urllib.request.urlopen(f"{self.dicomweb_url}/studies", timeout=5) as response:
                    if response.status in (200, 204):
                        return self
            except OSError:
                pass
            if time.time() > deadline:
                self.__exit__()
                raise RuntimeError(f"Orthanc not up after {self.start_timeout_s:.0f}s")
            time.sleep(0.3)

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files (POST /instances, one by one, as Orthanc's own upload tool does)."""
        for path in files:
            request = urllib.request.Request(f"{self.url}/instances", data=Path(path).read_bytes(), method="POST",
                                             headers={"Content-Type": "application/dicom"})
            with urllib.request.urlopen(request, timeout=60) as response:
                if response.status != 200:
                    raise RuntimeError(f"Orthanc refused {Path(path).name}: HTTP {response.status}")

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        self._log.close()
        self.process = None
