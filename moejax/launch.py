"""Multi-host launch: one process per host, all running the same moejax command.

    python -m moejax.launch --coordinator HOST:PORT --num-processes N --process-id I -- moejax generate ...

or with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment instead of
the flags (left out entirely, JAX detects them under Slurm, Open MPI, Kubernetes or on Cloud TPU).
This initialises `jax.distributed` (process 0 hosts the coordinator) and then runs the moejax
command line in the same process, so a `--layout` spans every process's devices. Every process must
run the same command on the same inputs: each runs the same scheduler, so all plan identical
iterations and enter the same collectives. Only process 0 prints, unless --all-output.

A peer that dies (or stops sending heartbeats for --heartbeat-timeout seconds) is reported by JAX's
coordination service to the other processes, which then abort with JAX's "Terminating process because
the JAX distributed service detected fatal errors" and the unhealthy task ids instead of hanging in a
collective; a peer that never connects makes the others abort after --init-timeout seconds.
"""

from __future__ import annotations

import argparse
import os
import sys


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moejax.launch", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [--coordinator HOST:PORT --num-processes N --process-id I] "
                                      "[options] -- moejax COMMAND ...")
    # jax.distributed.initialize reads JAX_COORDINATOR_ADDRESS itself, but not the other two.
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address, where the coordinator listens (env JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"), metavar="N",
                   help="number of processes (env JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"), metavar="I",
                   help="this process's id, 0 .. N-1 (env JAX_PROCESS_ID)")
    p.add_argument("--local-devices", type=int, metavar="K",
                   help="CPU devices of this process (jax_num_cpu_devices): multi-host tests on one machine")
    p.add_argument("--init-timeout", type=int, default=300, metavar="S",
                   help="seconds to wait for every process to connect (default 300)")
    p.add_argument("--heartbeat-timeout", type=int, default=30, metavar="S",
                   help="seconds without heartbeats after which a process counts as dead (default 30)")
    p.add_argument("--shutdown-timeout", type=int, default=60, metavar="S",
                   help="seconds a finished process waits at exit for the others to finish (default 60)")
    p.add_argument("--all-output", action="store_true", help="let every process print, not only process 0")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- moejax COMMAND ...")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command[:1] == ["moejax"]:
        command = command[1:]
    if not command:
        parser.error("no moejax command after --")

    import jax

    if args.local_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.local_devices)
    try:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   initialization_timeout=args.init_timeout,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout,
                                   shutdown_timeout_seconds=args.shutdown_timeout)
    except Exception as e:  # bad arguments or a coordinator that cannot start (a failed connect aborts)
        print(f"moejax.launch: error: jax.distributed.initialize failed: {e} (give --coordinator, --num-processes "
              "and --process-id, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)",
              file=sys.stderr)
        return 1
    # Native libraries write to fd 1 too (gloo prints a line per rank when it connects): point fd 1 at
    # stderr so that stdout carries only moejax's own output (e.g. one JSON document).
    stdout = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = stdout if jax.process_index() == 0 or args.all_output else open(os.devnull, "w")

    from moejax.cli import main as cli_main

    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main())
