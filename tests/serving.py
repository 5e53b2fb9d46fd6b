"""A real prune-serve process on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self,
        models_dir: Path,
        log: Path,
        wait_for: str = "/ready",
        launcher: list[str] | None = None,
        **settings,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(
            os.environ,
            PRUNE_SERVE_MODELS_DIR=str(models_dir),
            PRUNE_SERVE_THREADS="1",
            PRUNE_SERVE_DEVICE="cpu",
        )
        env.update({f"PRUNE_SERVE_{k.upper()}": str(v) for k, v in settings.items()})
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 - stays open for the server's lifetime
        self.proc = subprocess.Popen(
            [
                *(launcher or [sys.executable, "-m", "service.cli"]),
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(wait_for)

    def _wait_ready(self, path: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prune-serve exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prune-serve did not get ready: {self.log.read_text()}")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of a metric whose labels include `labels`."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
            if m:
                found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
                if all(found.get(k) == v for k, v in labels.items()):
                    total += float(m.group(2))
        return total

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


def poll(condition, timeout: float, every: float = 0.05):
    """Wait until condition() is truthy: generous deadlines instead of fixed sleeps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")
