"""Every ```python and ```bash block of README.md runs, as written, so the README cannot rot.

A block runs in a fresh process (python: `python -c`; bash: `bash -euo pipefail -c`, with the
environment's `moejax` on PATH) in a scratch directory. HTML comments right above a block steer it:

    <!-- not run: REASON -->         skipped, with the reason shown (kept for what needs a GPU, other
                                     hosts, or would rebuild the environment)
    <!-- server: COMMAND --port P --> COMMAND runs in the background until /health answers, then the
                                     block runs against it, then the server is stopped; port P is
                                     replaced by a free one in both (the machine may have P taken)
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import subprocess_environment

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"((?:<!--[^>]*-->\s*\n)*)```(python|bash)\n(.*?)```", re.S)
BLOCK_TIMEOUT_S = 600
SERVER_START_S = 300


def blocks() -> list:
    text = README.read_text()
    out = []
    for m in BLOCK.finditer(text):
        line = text[:m.start(2)].count("\n") + 1
        notes = dict(re.findall(r"<!--\s*([\w ]+):\s*(.*?)\s*-->", m.group(1)))
        marks = [pytest.mark.skip(reason=f"README says: {notes['not run']}")] if "not run" in notes else []
        out.append(pytest.param(m.group(2), m.group(3), notes.get("server"), id=f"{m.group(2)}-line{line}",
                                marks=marks))
    return out


def environment() -> dict:
    env = subprocess_environment(drop=("JAX_", "XLA_"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's moejax
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: str, port: int, cwd: Path) -> subprocess.Popen:
    log = open(cwd / "server.log", "w")
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=environment(), stdout=log, stderr=log,
                            start_new_session=True)
    deadline = time.monotonic() + SERVER_START_S
    while True:
        assert proc.poll() is None, f"{command} exited:\n{(cwd / 'server.log').read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{command} did not answer /health in {SERVER_START_S} s"
        try:
            if httpx.get(f"http://localhost:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def test_readme_has_runnable_blocks():
    params = blocks()
    skipped = [p for p in params if p.marks]
    assert len(params) >= 8 and len(skipped) <= 4, [p.id for p in skipped]  # as few as possible not run


@pytest.mark.slow
@pytest.mark.parametrize("lang, code, server", blocks())
def test_readme_block_runs(lang, code, server, tmp_path):
    proc = None
    if server:
        readme_port, port = re.search(r"--port (\d+)", server).group(1), str(free_port())
        code = re.sub(rf"\b{readme_port}\b", port, code)
        proc = start_server(re.sub(rf"\b{readme_port}\b", port, server), int(port), tmp_path)
    try:
        argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        run = subprocess.run(argv, cwd=tmp_path, env=environment(), capture_output=True, text=True,
                             timeout=BLOCK_TIMEOUT_S)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-5000:]}"
    assert run.stdout.strip(), "the block printed nothing"
