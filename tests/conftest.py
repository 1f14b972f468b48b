"""Test setup: 8 CPU devices (the sharding tests' mesh), float32 matmuls at full precision, and one
persistent compilation cache for the whole run.

The suite compiles the same small programs in many processes (xdist workers, the CLI and multi-host
subprocesses, notebook kernels): compiling dominates its time on CPU, so every process (subprocesses
inherit the environment) shares compiled programs through JAX's persistent cache. Its key is the
program, the devices and the JAX/XLA versions and flags, so a stale entry is never used; the size
bound turns on JAX's file locking, for the processes writing it at once. XLA compiles CPU code
without LLVM's optimisation passes (--xla_backend_optimization_level=0): the suite's programs are tiny
and each runs briefly, compiling them takes ~0.6x as long, and the matmuls (library calls) and the
native kernels are unaffected."""

import os
from collections import Counter
from pathlib import Path

COMPILATION_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": str(Path(__file__).parent.parent / ".cache" / "jax-tests"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),
}
for name, value in COMPILATION_CACHE.items():
    os.environ.setdefault(name, value)
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # a level given wins
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402  (reads the variables above when imported)

# Must happen before JAX initialises its backends (i.e. before any array is made).
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("MOEJAX_KERNEL_BACKEND", "")


def subprocess_environment(drop: tuple[str, ...]) -> dict:
    """This environment without the variables whose names start with `drop` (a subprocess that must
    start as a user's would), except the compilation cache's and the compile flags: the cache changes
    no result, and without it (and the same flags, part of its key) every subprocess compiles from
    nothing what the others already compiled."""
    return {k: v for k, v in os.environ.items()
            if k in COMPILATION_CACHE or k == "XLA_FLAGS" or not k.startswith(drop)}


def pytest_collection_modifyitems(items):
    """Files with the most slow tests first, each file's tests in their order. xdist (`--dist loadfile
    --no-loadscope-reorder`) hands whole files to the workers in this order: the long files start at
    once and the short ones fill in at the end, so that both workers finish at about the same time
    (by default xdist starts with the files of most tests, and a long file started last is the
    whole run's tail)."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.path, i)
    items.sort(key=lambda item: (-slow[item.path], first[item.path]))
