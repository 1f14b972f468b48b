"""Multi-host on one machine: `python -m moejax.launch` processes with 4 CPU devices each, joined on
loopback (gloo collectives), run one layout over all 8 devices. Greedy outputs equal the
single-process run; a peer that dies or never comes makes the others exit non-zero with JAX's error
within a bounded time. Every process runs under a timeout, so a hung peer cannot stall the suite."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import subprocess_environment

from moejax.cli import main

PROMPTS = ["1,2,3,4,5", "7,8,9", ",".join(str((11 * i + 3) % 500) for i in range(29))]
GENERATE = ["moejax", "generate", "--model", "tiny-qwen3-moe", "--layout", "cpu8-ep", "--ignore-eos", "--json",
            *(a for p in PROMPTS for a in ("--prompt-token-ids", p))]
# The serving engine of this test and tests/test_serve_multihost.py: one shape, so that the second to run
# finds the first's programs in the compilation cache; 8-token iterations make the warm-up compile one
# prefill program (each costs ~10 s over 2 x 4 devices) and short requests few multi-host decode steps.
SERVING = ["--layout", "cpu8-ep", "--max-model-len", "64", "--token-budget", "8"]
PROCESS_TIMEOUT_S = 240  # a run takes ~30 s on 2 cores; only a hang gets near this
FATAL = "Terminating process because the JAX distributed service detected fatal errors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = subprocess_environment(drop=("JAX_",))
    # CPU devices even on a GPU machine; gloo is jax's default CPU collectives, named to be explicit
    e.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **extra)
    return e


def launch(pid: int, port: int, command: list[str], tmp_path, *options: str, flags: bool = True) -> subprocess.Popen:
    """One process of 2 (4 CPU devices); its id and the coordinator come by flags or, as in JAX's docs,
    by environment variables. stdout / stderr go to files in tmp_path."""
    address = f"127.0.0.1:{port}"
    ids = ["--coordinator", address, "--num-processes", "2", "--process-id", str(pid)] if flags else []
    extra = {} if flags else {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
    with open(tmp_path / f"out{pid}", "w") as out, open(tmp_path / f"err{pid}", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "moejax.launch", *ids, "--local-devices", "4", *options,
                                 "--", *command], stdout=out, stderr=err, env=env(**extra))


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def finish(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Exit codes; a process still running after timeout_s (all together) is killed and fails the test
    with TimeoutExpired."""
    deadline = time.monotonic() + timeout_s
    try:
        return [p.wait(max(0.0, deadline - time.monotonic())) for p in procs]
    finally:
        stop(procs)


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path, capsys):
    command = [*GENERATE, "--max-tokens", "8"]
    assert main(command[1:]) == 0  # this process: the same layout on its own 8 CPU devices
    want = json.loads(capsys.readouterr().out)["outputs"]

    port = free_port()
    procs = [launch(0, port, command, tmp_path), launch(1, port, command, tmp_path, flags=False)]
    codes = finish(procs, PROCESS_TIMEOUT_S)
    assert codes == [0, 0], (tmp_path / "err0").read_text()[-3000:] + (tmp_path / "err1").read_text()[-3000:]
    got = json.loads((tmp_path / "out0").read_text())["outputs"]  # stdout holds exactly one JSON document
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
    assert (tmp_path / "out1").read_text() == ""  # process 1 stays quiet


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["worker-dies", "coordinator-dies"])
def test_dead_peer_makes_survivor_exit(tmp_path, victim):
    port = free_port()
    command = [*GENERATE, "--max-tokens", "500"]  # far longer than the test waits
    procs = [launch(pid, port, command, tmp_path, "--heartbeat-timeout", "5") for pid in (0, 1)]
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        # gloo logs a line when the processes' collectives connect: both are then inside the run
        while "[Gloo]" not in (tmp_path / "err0").read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not start"
            time.sleep(0.2)
        procs[victim].send_signal(signal.SIGKILL)
        code = finish([procs[1 - victim]], 60)[0]  # heartbeats stop after 5 s: well within
    finally:
        stop(procs)
    err = (tmp_path / f"err{1 - victim}").read_text()
    assert code != 0 and FATAL in err, err[-3000:]


@pytest.mark.slow
def test_missing_peer_fails_initialisation(tmp_path):
    proc = launch(0, free_port(), [*GENERATE, "--max-tokens", "2"], tmp_path, "--init-timeout", "3")
    code = finish([proc], 60)[0]
    err = (tmp_path / "err0").read_text()
    assert code != 0 and FATAL in err and "DEADLINE_EXCEEDED" in err, err[-3000:]


def test_missing_settings_are_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "moejax.launch", "--", "moejax", "generate"], env=env(),
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == 1 and proc.stderr.startswith("moejax.launch: error: jax.distributed.initialize failed"), \
        proc.stderr
    assert "JAX_COORDINATOR_ADDRESS" in proc.stderr


@pytest.mark.slow
def test_serving_with_arrivals_over_time(tmp_path):
    """Requests arriving at a finite rate are admitted by process 0's clock: both processes plan the
    same iterations and finish (a disagreement would hang them in different collectives)."""
    command = ["moejax", "bench", "serve", "--model", "tiny-qwen3-moe", *SERVING, "--rate", "20", "--num-requests", "4",
               "--json", str(tmp_path / "serve.json")]
    port = free_port()
    procs = [launch(0, port, command, tmp_path), launch(1, port, command, tmp_path)]
    codes = finish(procs, PROCESS_TIMEOUT_S)
    assert codes == [0, 0], (tmp_path / "err0").read_text()[-3000:] + (tmp_path / "err1").read_text()[-3000:]
    result = json.loads((tmp_path / "serve.json").read_text())
    assert result["metrics"]["num_requests"] == 4 and result["rate"] == 20
