"""`dice run` without a configured Prefect API: its private server dies with it, even by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, or a pid reused by another program, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return stat.split(") ", 1)[1][0] != "Z" and b"uvicorn" in command


def _uvicorn_children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().split(") ", 1)[1].split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            continue
        if ppid == parent and _alive(int(stat.parent.name)):
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_dice_run_stops_its_prefect_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    command = [sys.executable, "-m", "flows.cli", "run", "tiny"]
    command += ["--store", str(tmp_path / "store"), "--run-id", "k"]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    server, lines = None, []
    try:
        deadline = time.monotonic() + 300
        for line in process.stdout:
            lines.append(line)
            if "round 0 | started" in line or time.monotonic() > deadline:
                break
        servers = _uvicorn_children(process.pid)
        assert len(servers) == 1, "".join(lines[-30:])
        server = servers[0]
        # Only the dice process is killed, as the kernel's OOM killer would: not its group.
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server), f"the Prefect server {server} outlived its run"
        assert f"prefect server | pid {server} |" in "".join(lines)
    finally:
        try:  # whatever the run had started (its group outlives its leader)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        if server and _alive(server):
            os.kill(server, signal.SIGKILL)
        process.stdout.close()


def _descendants(root: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(") ", 1)[1].split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            continue
    found, frontier = [], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_dice_run_and_all_it_started(tmp_path):
    """SIGINT to the run's process group, as a terminal's Ctrl-C sends it, during training:
    the run exits with 130 and one line, and every process it started is gone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    command = [sys.executable, "-m", "flows.cli", "run", "tiny"]
    command += ["--store", str(tmp_path / "store"), "--run-id", "c"]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines, started = [], []
    try:
        for line in process.stdout:
            lines.append(line)
            if "dpo 1/" in line:  # round 0's DPO is at work
                break
        started = _descendants(process.pid)
        assert started, "".join(lines[-30:])  # its Prefect server at least
        os.killpg(process.pid, signal.SIGINT)
        rest = process.communicate(timeout=60)[0]
        assert process.returncode == 130, rest[-3000:]
        assert "interrupted (SIGINT)" in rest
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in started if _running(pid)]
    finally:
        for pid in [process.pid, *started]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
