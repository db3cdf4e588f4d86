"""Shared fixtures: a real gateway process on a free loopback port, driven over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str, data: Path | None = None, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``execguard`` command in a subprocess."""
    argv = [sys.executable, "-m", "execguard", *args]
    if data is not None:
        argv += ["--data", str(data)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"execguard {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def api_key_from(output: str) -> str:
    """The value of the last ``EXECGUARD_API_KEY=`` line."""
    lines = [ln for ln in output.splitlines() if ln.startswith("EXECGUARD_API_KEY=")]
    assert lines, f"no EXECGUARD_API_KEY line in:\n{output}"
    return lines[-1].split("=", 1)[1]


@dataclass
class Gateway:
    """A running ``execguard serve`` process and how to talk to it."""

    data: Path
    port: int
    api_key: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str | None = None, **kwargs: object) -> httpx.Client:
        key = self.api_key if api_key is None else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0, **kwargs)

    def start(self, require_ready: bool = True) -> None:
        """Start ``execguard serve``; wait until /readyz says ready (or just answers)."""
        self.log_path = self.data.parent / f"server-{self.port}.log"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "execguard", "serve", "--data", str(self.data),
             "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited early:\n{self.log_path.read_text()}")
            try:
                status = httpx.get(f"{self.url}/readyz", timeout=1.0).status_code
                if status == 200 or not require_ready:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"gateway did not become ready:\n{self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("gateway did not stop within 30 s of SIGTERM") from None


def start_gateway(tmp: Path) -> Gateway:
    """Initialise a data directory with the real CLI and start a gateway on it."""
    data = tmp / "data"
    init = run_cli("init", data=data)
    gateway = Gateway(data=data, port=free_port(), api_key=api_key_from(init.stdout))
    gateway.start()
    return gateway


def start_gateway_with_broken_key(tmp: Path) -> Gateway:
    """A gateway whose signing key file is garbage: it must fail closed (503)."""
    data = tmp / "data"
    key = api_key_from(run_cli("init", data=data).stdout)
    for pem in (data / "keys").glob("*.pem"):
        pem.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    gateway = Gateway(data=data, port=free_port(), api_key=key)
    gateway.start(require_ready=False)
    return gateway


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway shared by the tests that only add decisions of their own."""
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield gw
    gw.stop()


@pytest.fixture
def fresh_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway of the test's own, for tests that change policy or count the log."""
    gw = start_gateway(tmp_path)
    yield gw
    if gw.process is not None and gw.process.poll() is None:
        gw.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.client() as c:
        yield c
