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
