"""Test helpers for the operations tests: a real `mlflow server`, a TCP proxy that can cut the
connection to it (the tracking server "going away" as training sees it), and headless Chromium.

No port is picked and then hoped to be free: the server binds port 0 itself and reports the port
it got, and the proxy keeps its own listening socket for its whole life.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    """A port free at the moment of asking: for daemons that read their port from a config
    file and cannot report one they bound themselves (test_slurm's slurmctld / slurmd). The
    servers here bind port 0 instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """End a process started with start_new_session=True and everything it started."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


class MlflowServer:
    """`mlflow server` on a SQLite store with a local artifact root, on a loopback port that its
    uvicorn binds (port 0) and reports once the application has started: ``start`` returns when
    the server answers, with no clock involved."""

    LISTENING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:(\d+))")

    def __init__(self, root: Path):
        self.root = root
        self.port: int | None = None
        self.url: str | None = None
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", "0", "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        # The job runner is a second long-lived process that this store has no use for.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, start_new_session=True,
                                     text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        log = self.log.open("a")
        for line in self.proc.stdout:  # until uvicorn says where it listens, or the server ends
            log.write(line)
            log.flush()
            listening = self.LISTENING.search(line)
            if listening:
                break
        else:
            code = self.proc.wait()
            log.close()
            raise AssertionError(f"mlflow server exited ({code}) before listening:\n"
                                 f"{self.log.read_text()[-3000:]}")
        self.url, self.port = listening[1], int(listening[2])
        threading.Thread(target=self._copy_log, args=(log,), daemon=True).start()
        return self

    def _copy_log(self, log) -> None:
        with log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


class TcpProxy:
    """Forwards a loopback port of its own to a target port. ``down()`` cuts every open
    connection and, until ``up()``, resets every new one as soon as it is accepted: to a client
    the server is gone. The listening socket stays bound meanwhile, so no other process can take
    its port. ``resets`` counts the connections refused while down."""

    def __init__(self, target_port: int):
        self.target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.resets = 0
        self._down = True
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def up(self) -> "TcpProxy":
        with self._lock:
            self._down = False
        return self

    def down(self) -> None:
        with self._lock:
            self._down = True
            conns, self._conns = self._conns, []
        for conn in conns:
            _cut(conn)

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            with self._lock:
                down = self._down
                self.resets += down
            if down:
                _reset(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _cut(src)
            _cut(dst)


def _cut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _reset(conn: socket.socket) -> None:
    """Close with an RST (linger on, 0 s): the peer's request fails at once."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt when missing (root only; CI runs as root)."""
    if not os.path.exists(CHROMIUM):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("chromium is not installed and apt-get needs root")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True,
                       timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                       check=True, env=env, capture_output=True, timeout=900)
    return CHROMIUM
