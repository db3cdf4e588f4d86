"""The server's decision process: replaced when it dies or hangs, never left behind.

``POST /execute`` is decided and appended by a process of the server's own
(``server/decision_worker.py``). Whatever happens to it, no request is answered
PERMIT without a durable entry, clients get 503 with a clear error meanwhile,
``/readyz`` says why, and the server recovers by itself with the log intact.
Run on both backends (the ``database`` fixture).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, api_key_from, free_port, run_cli, start_gateway

PAYMENT = {"surface": "payment.execute", "actorId": "agent-dp",
           "context": {"amount": 1, "currency": "EUR", "beneficiary": "Acme Office Supplies"}}


def workers_of(server_pid: int) -> list[int]:
    """The server's child processes (its decision process), from /proc."""
    found: list[int] = []
    for children in Path(f"/proc/{server_pid}/task").glob("*/children"):
        try:
            found.extend(int(pid) for pid in children.read_text().split())
        except OSError:
            continue
    return found


def the_worker(gateway: Gateway) -> int:
    assert gateway.process is not None
    workers = workers_of(gateway.process.pid)
    assert len(workers) == 1, f"expected one decision process, found {workers}"
    return workers[0]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(check: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


def decide(client: httpx.Client, key: str) -> httpx.Response:
    return client.post("/execute", json=PAYMENT, headers={"Idempotency-Key": key})


def audit_passes(gateway: Gateway, client: httpx.Client, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(client.get("/.well-known/trigguard/keys.json").json()))
    audit = run_cli("audit", "--db", gateway.ledger, "--keys", str(keys), "--no-state",
                    "--json", check=False)
    assert audit.returncode == 0, f"audit failed:\n{audit.stdout}\n{audit.stderr}"


pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(),
                                reason="finds the decision process through /proc (Linux)")


def test_a_killed_decision_process_is_replaced(fresh_gateway: Gateway, tmp_path: Path) -> None:
    with fresh_gateway.client() as client:
        before = decide(client, "dp-before")
        assert before.status_code == 200, before.text
        worker = the_worker(fresh_gateway)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not alive(worker), 10, "the decision process to die")

        # Until a new one is ready: 503 at once, never a decision; readiness says why.
        for attempt in range(400):
            answer = decide(client, f"dp-during-{attempt}")
            if answer.status_code == 200:
                break
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"] == "service_unavailable"
            assert "decision process" in answer.json()["message"]
            assert answer.headers["Retry-After"] == "1"
            if attempt == 0:
                ready = client.get("/readyz")
                if ready.status_code == 503:
                    assert any("decision process" in p for p in ready.json()["problems"])
            time.sleep(0.02)
        else:
            raise AssertionError("no decision process came back")

        replacement = the_worker(fresh_gateway)
        assert replacement != worker
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "ready again")
        # What was recorded before the kill is still answered from the log, unchanged.
        again = decide(client, "dp-before")
        assert again.json()["receipt"] == before.json()["receipt"]
        after = decide(client, "dp-after")
        assert after.status_code == 200 and after.json()["decision"] == "PERMIT"
        assert after.json()["receipt"]["logIndex"] > before.json()["receipt"]["logIndex"]
    audit_passes(fresh_gateway, fresh_gateway.client(), tmp_path)


def test_a_decision_process_killed_under_load_is_said_to_have_exited(
        fresh_gateway: Gateway) -> None:
    """Killed with requests on their way to it, its socket broke: the log said it 'sent
    something unreadable (Connection reset by peer)', which sends an operator looking
    for a protocol bug. It says that it exited, and how."""
    worker = the_worker(fresh_gateway)
    stop = threading.Event()

    def load(n: int) -> None:
        with fresh_gateway.client() as client:
            for i in itertools.count():
                if stop.is_set():
                    return
                decide(client, f"dp-load-{n}-{i}")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for n in range(8):
            pool.submit(load, n)
        time.sleep(1.0)
        os.kill(worker, signal.SIGKILL)
        time.sleep(1.0)
        stop.set()
    logged = fresh_gateway.log_path.read_text()
    assert "the decision process exited (" in logged
    assert "unreadable" not in logged


def test_a_decision_process_that_stops_answering_is_replaced(
        fresh_gateway: Gateway, tmp_path: Path) -> None:
    decided = 0  # answers 200: the log must hold exactly these, nothing a client was refused

    def succeeds(key: str) -> bool:
        nonlocal decided
        answer = decide(client, key)
        decided += answer.status_code == 200
        return answer.status_code == 200

    with fresh_gateway.client() as client:
        assert succeeds("dp-hang-before")
        worker = the_worker(fresh_gateway)
        os.kill(worker, signal.SIGSTOP)  # alive, holding its socket, answering nothing
        try:
            # The server validates the body itself: a malformed one is refused at once.
            malformed = client.post("/execute", json={**PAYMENT, "surface": 7})
            assert malformed.status_code == 422, malformed.text
            assert (malformed.json()["error"], malformed.json()["field"]) \
                == ("malformed_request", "surface"), malformed.text
            time.sleep(1.1)  # past the cached answer of the last readiness check
            with concurrent.futures.ThreadPoolExecutor(1) as pool, \
                    fresh_gateway.client() as other:
                started = time.monotonic()
                pending = pool.submit(decide, other, "dp-hang-1")  # waits ~7 s for an answer
                time.sleep(0.2)
                # Asks the worker for a write, asked later but given 2 s: it times out first.
                ready = client.get("/readyz")
                assert time.monotonic() - started < 6 and not pending.done()  # not at ~7 s
                assert ready.status_code == 503, ready.text
                assert any("decision process" in p for p in ready.json()["problems"]), \
                    ready.text
                stuck = pending.result()
                waited = time.monotonic() - started
            assert stuck.status_code == 503, stuck.text
            assert stuck.json()["error"] == "storage_unavailable"
            assert "did not answer" in stuck.json()["message"]
            assert waited < 20
            # The stuck process is killed and replaced; decisions come back by themselves.
            wait_for(lambda: not alive(worker), 10, "the stuck process to be killed")
            counter = iter(range(10_000))
            wait_for(lambda: succeeds(f"dp-hang-again-{next(counter)}"), 30,
                     "decisions to succeed again")
        finally:
            if alive(worker):
                os.kill(worker, signal.SIGKILL)
        assert the_worker(fresh_gateway) != worker
        assert succeeds("dp-hang-1")  # refused before, so decided now, once
    (size,), = fresh_gateway.sql("SELECT COUNT(*) FROM log WHERE tenant = 'demo'")
    assert size == decided
    audit_passes(fresh_gateway, fresh_gateway.client(), tmp_path)


def test_the_decision_process_ends_with_the_server(fresh_gateway: Gateway) -> None:
    with fresh_gateway.client() as client:
        assert decide(client, "dp-end").status_code == 200
    worker = the_worker(fresh_gateway)
    assert fresh_gateway.process is not None
    fresh_gateway.process.kill()  # SIGKILL: no chance to stop it
    fresh_gateway.process.wait(timeout=10)
    wait_for(lambda: not alive(worker), 10, "the orphaned decision process to die")


def test_a_stopped_server_stops_its_decision_process(fresh_gateway: Gateway) -> None:
    with fresh_gateway.client() as client:
        assert decide(client, "dp-stop").status_code == 200
    worker = the_worker(fresh_gateway)
    assert fresh_gateway.stop() == 0
    wait_for(lambda: not alive(worker), 10, "the decision process to stop")


def test_a_sigterm_to_the_whole_process_group_stops_cleanly(fresh_gateway: Gateway) -> None:
    """systemd (KillMode=control-group) and timeout(1) signal the server and its decision
    process together. The decision process used to die at once: requests in flight got 503
    and the server restarted it while stopping. It now waits for the server to close it."""
    worker = the_worker(fresh_gateway)
    assert fresh_gateway.process is not None

    def one(n: int) -> int | None:
        try:
            with fresh_gateway.client() as client:
                return decide(client, f"dp-group-{n}").status_code
        except httpx.HTTPError:  # after the server stopped taking requests
            return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(one, n) for n in range(400)]
        wait_for(lambda: sum(a.done() for a in answers) >= 20, 30, "requests under way")
        os.kill(worker, signal.SIGTERM)  # as a process group's signal reaches both
        os.kill(fresh_gateway.process.pid, signal.SIGTERM)
        statuses = [a.result() for a in answers]
    assert fresh_gateway.process.wait(timeout=40) == 0
    assert set(statuses) <= {200, None} and statuses.count(200) >= 20, statuses
    logged = fresh_gateway.log_path.read_text()
    assert "restarting it" not in logged and "stopped before answering" not in logged
    wait_for(lambda: not alive(worker), 10, "the decision process to stop")


def test_a_server_stopped_while_its_decision_process_restarts_stops_at_once(
        fresh_gateway: Gateway) -> None:
    worker = the_worker(fresh_gateway)
    assert fresh_gateway.process is not None
    os.kill(worker, signal.SIGKILL)
    time.sleep(0.3)  # a new one is being started: it has nothing to finish
    started = time.monotonic()
    assert fresh_gateway.stop() == 0
    assert time.monotonic() - started < 10
    assert workers_of(fresh_gateway.process.pid) == []


def test_decision_log_lines_and_metrics_come_through(fresh_gateway: Gateway) -> None:
    with fresh_gateway.client() as client:
        answer = decide(client, "dp-metrics")
        assert answer.status_code == 200
        metrics = client.get("/metrics").text
    line = ('execguard_decisions_total{decision="PERMIT",surface="payment.execute",'
            'mode="enforce"} 1')
    assert line in metrics
    assert "execguard_group_commit_batches_total 1" in metrics
    fresh_gateway.stop()  # log lines are written by a thread of their own: all, by exit
    logged: list[dict[str, Any]] = []
    assert fresh_gateway.log_path is not None
    for raw in fresh_gateway.log_path.read_text().splitlines():
        if raw.startswith("{"):
            logged.append(json.loads(raw))
    decisions = [r for r in logged if r.get("logger") == "execguard.decisions"]
    assert [d["execution_id"] for d in decisions] == [answer.json()["execution_id"]]
    assert decisions[0]["request_id"] == answer.json()["request_id"]
    assert decisions[0]["tenant"] == "demo"


def test_a_restarted_decision_process_opens_only_the_servers_file(tmp_path: Path) -> None:
    """A worker started after the SQLite file was replaced (here by a copy of itself) must
    not append to the file now at the path: the log would split in two. Once the server's
    own file is back, decisions come back."""
    data = tmp_path / "data"
    init = run_cli("init", data=data)
    gateway = Gateway(data=data, port=free_port(), api_key=api_key_from(init.stdout))
    gateway.start()
    database, aside = data / "execguard.db", tmp_path / "execguard.db.aside"
    try:
        with gateway.client() as client:
            first = decide(client, "dp-file-1")
            assert first.status_code == 200, first.text
            worker = the_worker(gateway)
            os.rename(database, aside)
            shutil.copyfile(aside, database)  # the same bytes, another file
            copied = database.read_bytes()  # not opened here: it would share the WAL
            os.kill(worker, signal.SIGKILL)
            wait_for(lambda: not alive(worker), 10, "the decision process to die")
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:  # restarts come and go: none may decide
                answer = decide(client, f"dp-file-during-{time.monotonic()}")
                assert answer.status_code == 503, answer.text
                time.sleep(0.1)
            assert database.read_bytes() == copied  # nobody wrote to the copy
            os.replace(aside, database)
            again = wait_for(lambda: (r := decide(client, "dp-file-2")).status_code == 200
                             and r, 30, "decisions to come back with the file")
            assert again.json()["receipt"]["logIndex"] == 1
        audit_passes(gateway, gateway.client(), tmp_path)
    finally:
        if aside.exists():
            os.replace(aside, database)
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()


def closed_by_server(sock: socket.socket, within: float, trickle: bool = False) -> bool:
    """Whether the server closes ``sock`` within ``within`` s (sending it one byte a second
    meanwhile if ``trickle``)."""
    deadline = time.monotonic() + within
    sock.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            if trickle:
                sock.sendall(b" ")
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset, or a broken pipe from the trickle: closed all the same
            return True
    return False


def test_connections_that_send_no_whole_request_are_closed(gateway: Gateway) -> None:
    """A connection that sends nothing, half a request's headers, or a body one byte a
    second was held open for good: a thousand such exhausted the server's open files,
    and then no client could connect. Each is now closed; real clients are not."""
    head = (f"POST /execute HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gateway.api_key}\r\n"
            f"Content-Type: application/json\r\n").encode()
    silent = socket.create_connection(("127.0.0.1", gateway.port))
    half_headers = socket.create_connection(("127.0.0.1", gateway.port))
    half_headers.sendall(head)
    slow_body = socket.create_connection(("127.0.0.1", gateway.port))
    slow_body.sendall(head + b"Content-Length: 1000\r\n\r\n{")
    with silent, half_headers, slow_body, \
            concurrent.futures.ThreadPoolExecutor(3) as pool:
        closed = [pool.submit(closed_by_server, silent, 60.0),
                  pool.submit(closed_by_server, half_headers, 60.0),
                  pool.submit(closed_by_server, slow_body, 60.0, trickle=True)]
        with gateway.client() as client:
            assert decide(client, "alongside-slow-clients").status_code == 200
        assert [c.result() for c in closed] == [True, True, True]


async def decide_at_once(gateway: Gateway, count: int) -> list[int]:
    """The statuses of ``count`` decisions asked together (distinct keys)."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {gateway.api_key}"}) as c:
        answers = await asyncio.gather(*(
            c.post("/execute", json=PAYMENT, headers={"Idempotency-Key": f"dp-many-{n}"})
            for n in range(count)))
    return [answer.status_code for answer in answers]


def test_a_stuck_decision_process_is_replaced_once_however_many_wait(
        fresh_gateway: Gateway) -> None:
    """Every request a stuck worker left waiting times out at about the same moment; each
    one logged "replacing it" and killed it again: one line (and one kill) is enough."""
    with fresh_gateway.client() as client:
        assert decide(client, "dp-many-before").status_code == 200
        worker = the_worker(fresh_gateway)
        os.kill(worker, signal.SIGSTOP)
        try:
            statuses = asyncio.run(decide_at_once(fresh_gateway, 300))
            assert set(statuses) == {503}, statuses
            wait_for(lambda: not alive(worker), 10, "the stuck process to be killed")
        finally:
            if alive(worker):
                os.kill(worker, signal.SIGKILL)
    replacing = [line for line in fresh_gateway.log_path.read_text().splitlines()
                 if "answered nothing for" in line]
    assert len(replacing) == 1, replacing


def test_the_server_may_open_as_many_files_as_the_hard_limit_allows(tmp_path: Path) -> None:
    """Each connection holds a file: at a shell's soft limit of 1,024, a burst of clients
    made accept() fail for everyone, /healthz included."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.skip("the hard limit on open files is too low to lower the soft one")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        gateway = start_gateway(tmp_path)  # inherits the soft limit of 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert gateway.process is not None
        limits = Path(f"/proc/{gateway.process.pid}/limits").read_text()
        (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
        assert line.split()[3] == line.split()[4] != "256", line
    finally:
        gateway.stop()
