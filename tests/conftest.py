"""Test setup: 8 CPU devices (the sharding tests' mesh), float32 matmuls at full precision."""

import os

import jax

# Must happen before JAX initialises its backends (i.e. before any array is made).
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("MOEJAX_KERNEL_BACKEND", "")
