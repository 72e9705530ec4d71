"""Start and stop a live ``python -m ponder serve`` (the built-in models) on a free loopback
port, for tests and benchmarks. Needs the ``serve`` extra and ``httpx``.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

#: the API key ``start_serve`` passes with ``--api-key``
SERVE_KEY = "test-key"
#: the default flags of ``start_serve``: small limits keep every request a fuzz can make cheap on
#: the built-in models
SERVE_ARGS = ("--max-queue", "3", "--max-choices", "4", "--max-search-n", "8", "--max-iterations", "8",
              "--max-steps", "8", "--max-step-tokens", "48", "--request-timeout", "60", "--grace", "3",
              "--kv-budget", "8192")


def start_serve(args=SERVE_ARGS, log_dir=None, timeout_s: float = 300.0):
    """Start ``python -m ponder serve --api-key SERVE_KEY *args`` on a free loopback port (the
    built-in models), its output to ``serve.log`` in ``log_dir`` (a new temporary folder by
    default), and wait until ``/health`` answers 200. Returns a namespace with ``proc``
    (the ``Popen``), ``port``, ``url``, ``log`` (its path) and ``key``. ``RuntimeError`` with
    the log's tail if the server exits first or does not answer within ``timeout_s`` (then it
    is killed)."""
    import socket
    import subprocess
    import tempfile
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = os.path.join(log_dir or tempfile.mkdtemp(prefix="ponder-serve-"), "serve.log")
    cmd = [sys.executable, "-m", "ponder", "serve", "--port", str(port), "--api-key", SERVE_KEY, *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ponder serve exited with {proc.returncode}: {open(log).read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"ponder serve did not start in {timeout_s} s: {open(log).read()[-2000:]}")
        time.sleep(0.5)
    return SimpleNamespace(proc=proc, port=port, url=url, log=log, key=SERVE_KEY)


def stop_serve(server, timeout_s: float = 60.0) -> int | None:
    """SIGTERM the server of ``start_serve`` (if still running) and wait up to ``timeout_s``
    (then SIGKILL); returns its exit status."""
    import signal
    import subprocess

    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode
