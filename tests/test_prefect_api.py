"""`dice run` without a configured Prefect API: its private server dies with it, even by SIGKILL;
Ctrl-C stops the run and everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's"
)


# ---------------------------------------------------------- processes, read from /proc
def _parents() -> dict[int, int]:
    """The parent of every running process."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(") ", 1)[1].split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            continue
    return parents


def _descendants(root: int) -> list[int]:
    parents = _parents()
    found, frontier = [], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _running(pid: int) -> bool:
    """Whether the process runs (a zombie does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _uvicorn(pid: int) -> bool:
    """Whether the process runs and is a uvicorn server (not a pid reused by another program)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return _running(pid) and b"uvicorn" in command


def _start_run(tmp_path: Path, run_id: str) -> subprocess.Popen:
    """`dice run tiny` with no Prefect API configured, in a process group of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    command = [sys.executable, "-m", "flows.cli", "run", "tiny"]
    command += ["--store", str(tmp_path / "store"), "--run-id", run_id]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _read_until(process: subprocess.Popen, marker: str, timeout: float = 300) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    return lines


def _wait_gone(pids: list[int], alive, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [pid for pid in pids if alive(pid)]


# ------------------------------------------------------------------------------ tests
def test_sigkill_of_dice_run_stops_its_prefect_server(tmp_path):
    process = _start_run(tmp_path, "k")
    server = None
    try:
        lines = _read_until(process, "round 0 | started")
        servers = [pid for pid, parent in _parents().items() if parent == process.pid]
        servers = [pid for pid in servers if _uvicorn(pid)]
        assert len(servers) == 1, "".join(lines[-30:])
        server = servers[0]
        # Only the dice process is killed, as the kernel's OOM killer would: not its group.
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        left = _wait_gone([server], _uvicorn, 20)
        assert not left, f"the Prefect server {server} outlived its run"
        assert f"prefect server | pid {server} |" in "".join(lines)
    finally:
        try:  # whatever the run had started (its group outlives its leader)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        if server and _uvicorn(server):
            os.kill(server, signal.SIGKILL)
        process.stdout.close()


def test_ctrl_c_stops_dice_run_and_all_it_started(tmp_path):
    """SIGINT to the run's process group, as a terminal's Ctrl-C sends it, during training:
    the run exits with 130 and one line, and every process it started is gone."""
    process = _start_run(tmp_path, "c")
    started = []
    try:
        lines = _read_until(process, "dpo 1/")  # round 0's DPO is at work
        started = _descendants(process.pid)
        assert started, "".join(lines[-30:])  # its Prefect server at least
        os.killpg(process.pid, signal.SIGINT)
        rest = process.communicate(timeout=60)[0]
        assert process.returncode == 130, rest[-3000:]
        assert "interrupted (SIGINT)" in rest
        assert not _wait_gone(started, _running, 10)
    finally:
        for pid in [process.pid, *started]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
