"""The Prefect API a `dice run` talks to: the configured one, or a private server that dies with it.

Without `PREFECT_API_URL`, Prefect would start its own temporary server in a child process
and stop it at exit; a run killed with SIGKILL (or by the kernel's out-of-memory killer) never
reaches that exit, and the server lives on, holding its port and a few hundred MB. The private
server here runs the same application, with the settings Prefect gives its temporary server
(no UI, the lighter set of background services), in a child that the kernel stops when its
parent dies, however it dies (Linux: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from dice_core.errors import DiceError

log = logging.getLogger("dice")

_PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 90.0


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Yield the API URL in use: the configured one, or a private server's."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured or not sys.platform.startswith("linux"):
        yield configured  # elsewhere, Prefect's own temporary server
        return
    with _private_server() as url, temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


@contextmanager
def _private_server() -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        # What Prefect sets for its temporary server: no UI, fewer background services.
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error"]
    command += ["--lifespan", "on"]
    # Its errors go to an unnamed file, read only if it fails to start (a pipe could fill up
    # over a long run and block the server).
    errors = tempfile.TemporaryFile()
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=errors,
        preexec_fn=_die_with_parent,
    )
    try:
        _wait_healthy(process, url, errors)
    except BaseException:
        _stop(process)
        raise
    # Stopped at exit, as Prefect stops its own: Prefect's log and event workers, registered
    # later, run their exit handlers first and still reach the server to flush.
    atexit.register(_stop, process)
    log.info("prefect server | pid %d | %s | stops with this run", process.pid, url)
    yield url


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        os._exit(121)
    if os.getppid() == 1:  # the parent died before prctl: nobody will stop us
        os._exit(121)


def _wait_healthy(process: subprocess.Popen, url: str, errors: IO[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                errors.seek(0)
                tail = errors.read().decode(errors="replace").strip().splitlines()[-5:]
                raise DiceError(
                    f"the run's Prefect server exited with code {process.returncode} at start: "
                    + (" | ".join(tail) or "no output")
                )
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    _stop(process)
    raise DiceError(
        f"the run's Prefect server did not answer on {url} within {STARTUP_TIMEOUT_S:.0f} s; "
        "set PREFECT_API_URL to use a running server"
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
