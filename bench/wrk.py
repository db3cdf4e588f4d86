"""Driving wrk: a Lua script for the POST request and the body check, and its output parsed.

wrk reports throughput, socket errors and (with ``--latency``) the latency
distribution; the Lua ``response`` hook counts non-200 answers and 200 answers
without the expected text, and ``done`` prints those counts on one line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from loadgen import LoadResult, LoadSpec

__all__ = ["find_wrk", "parse_wrk", "run_wrk", "write_script", "wrk_version"]

_LUA = """\
wrk.method = "POST"
wrk.body = {body}
{headers}
local expect = {expect}
local run = {run}
local actors = {actors}
local threads = {{}}
local seq = 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

function init(args)
  non200 = 0
  wrong = 0
end

-- Every request distinct: {{seq}} unique per run (thread id + counter). {{actor}} takes
-- every one of the actors in turn (from the counter, not from {{seq}}: 64 * seq modulo
-- 1000 would only ever reach 125 of them).
function request()
  seq = seq + 1
  local n = seq * 64 + id
  local function fill(text)
    text = string.gsub(text, "{{run}}", run)
    text = string.gsub(text, "{{seq}}", tostring(n))
    return (string.gsub(text, "{{actor}}", tostring((seq + id) % actors)))
  end
  local headers = {{}}
  for name, value in pairs(wrk.headers) do headers[name] = fill(value) end
  return wrk.format(nil, nil, headers, fill(wrk.body))
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
  elseif expect ~= "" and not string.find(body, expect, 1, true) then
    wrong = wrong + 1
  end
end

function done(summary, latency, requests)
  local n, w = 0, 0
  for _, thread in ipairs(threads) do
    n = n + thread:get("non200")
    w = w + thread:get("wrong")
  end
  io.write(string.format("bodycheck non200=%d wrong=%d\\n", n, w))
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_LATENCY = re.compile(r"^\s+Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m|h)", re.M)
_TOTAL = re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_BODYCHECK = re.compile(r"^bodycheck non200=(\d+) wrong=(\d+)", re.M)


def find_wrk() -> str | None:
    """The wrk executable on PATH, if any."""
    return shutil.which("wrk")


def wrk_version(wrk: str) -> str:
    """``wrk 4.1.0 [epoll]`` or just ``wrk`` (``wrk -v`` exits 1 by design)."""
    try:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "wrk"
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "wrk"


def _lua_string(text: str) -> str:
    """A Lua string literal: printable ASCII kept, everything else as decimal escapes."""
    parts = [chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}"
             for b in text.encode()]
    return '"' + "".join(parts) + '"'


def write_script(path: Path, spec: LoadSpec) -> None:
    """Write the Lua script sending ``spec``'s requests and checking their answers."""
    headers = {**spec.headers, "Content-Type": "application/json"}
    lines = "\n".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}"
                      for k, v in headers.items())
    path.write_text(_LUA.format(body=_lua_string(spec.body), headers=lines,
                                expect=_lua_string(spec.expect),
                                run=_lua_string(os.urandom(6).hex()),
                                actors=max(1, spec.actors)))


def _ms(value: str, unit: str) -> float:
    return round(float(value) * _UNITS[unit], 3)


def parse_wrk(output: str) -> LoadResult:
    """The figures of one ``wrk --latency`` run with the script above."""
    percentiles = {p: _ms(v, u) for p, v, u in _PERCENTILE.findall(output)}
    total, rps = _TOTAL.search(output), _RPS.search(output)
    if total is None or rps is None or not {"50", "90", "99"} <= percentiles.keys():
        raise ValueError(f"unexpected wrk output:\n{output}")
    latency_max = _LATENCY.search(output)
    socket = _SOCKET.search(output)
    non_2xx = _NON_2XX.search(output)
    check = _BODYCHECK.search(output)
    non_200 = int(check.group(1)) if check else int(non_2xx.group(1)) if non_2xx else 0
    return LoadResult(
        requests=int(total.group(1)), seconds=_ms(total.group(2), total.group(3)) / 1e3,
        rps=float(rps.group(1)), p50_ms=percentiles["50"], p90_ms=percentiles["90"],
        p99_ms=percentiles["99"],
        max_ms=_ms(*latency_max.groups()) if latency_max else percentiles["99"],
        non_200=non_200, wrong_body=int(check.group(2)) if check else 0,
        errors=sum(int(n) for n in socket.groups()) if socket else 0)


def run_wrk(wrk: str, script: Path, spec: LoadSpec, threads: int) -> LoadResult:
    """Run wrk for ``spec.duration`` seconds (whole seconds) and parse its report."""
    seconds = max(1, round(spec.duration))
    argv = [wrk, f"-t{min(threads, spec.connections)}", f"-c{spec.connections}",
            f"-d{seconds}s", f"--timeout={max(1, round(spec.grace))}s", "--latency",
            "-s", str(script), f"http://{spec.host}:{spec.port}{spec.path}"]
    out = subprocess.run(argv, capture_output=True, text=True,
                         timeout=seconds + spec.grace + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()}")
    return parse_wrk(out.stdout)
