"""Test setup: 8 CPU devices (the sharding tests' mesh), float32 matmuls at full precision, and one
persistent compilation cache for the whole run.

The suite compiles the same small programs in many processes (xdist workers, the CLI and multi-host
subprocesses, notebook kernels): compiling dominates its time on CPU, so every process (subprocesses
inherit the environment) shares compiled programs through JAX's persistent cache. Its key is the
program, the devices and the JAX/XLA versions and flags, so a stale entry is never used; the size
bound turns on JAX's file locking, for the processes writing it at once."""

import os
from pathlib import Path

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).parent.parent / ".cache" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402  (reads the variables above when imported)

# Must happen before JAX initialises its backends (i.e. before any array is made).
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("MOEJAX_KERNEL_BACKEND", "")
