"""Start and stop a real MONAI Label server on loopback: for the live-server tests and the benchmarks."""

from __future__ import annotations

import os
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
                 start_timeout_s: float = 180.0, env: dict[str, str] | None = None):
        self.studies = Path(studies)
        self.work_dir = Path(work_dir)
        self.conf = dict(conf or {})
        self.start_timeout_s = start_timeout_s
        self.env = dict(env or {})
        self.port = free_port()
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
