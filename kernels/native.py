"""Native kernels for XLA:CPU (kernels/native/*.cc): XLA FFI custom calls in one library, built with the
system's C++ compiler on first use and cached per source, flags, jaxlib and machine.

    paged_attention   each row streams its KV blocks from the cache (XLA lowers the per-row block
                      gather to an element-wise loop and the attention to tiny batched dots); same
                      semantics as paged_attention.py's "rows" method, which it is tested against
    moe_ffn           the routed experts on a slot buffer: a counting sort of (token, k) pairs by slot
                      and both GEMMs per few rows of one expert, straight from the weights (XLA runs a
                      tile loop that copies each tile's expert weights); same semantics as
                      moejax.kernels.moe_ffn, tested against the reference backend
    matmul            x @ w for one or several weights in one call, every row computed alone (XLA:CPU's
                      dot computes a row differently depending on the number of rows):
                      moejax.kernels.dense on CPU
    top_k             the k largest of each row, as jax.lax.top_k, or its argmax as jnp.argmax
                      (XLA:CPU calls a sort routine / runs a two-operand reduction loop, both
                      slower per call at decode sizes): moejax.kernels.top_k and argmax on CPU

Where no compiler is found the jnp code runs, with one warning.

    MOEJAX_NATIVE=0          never use them
    MOEJAX_CACHE_DIR         where the built library is kept (default ~/.cache/moejax)
    MOEJAX_NATIVE_PARALLEL_MIN  the fewest multiply-adds a kernel call spreads over the thread pool
                             (default 524288; below, the calling thread does it alone)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from . import reference

SOURCES = Path(__file__).with_name("native")
TARGETS = {"moejax_paged_attention": "MoejaxPagedAttention", "moejax_moe_ffn": "MoejaxMoeFfn",
           "moejax_matmul": "MoejaxMatmul", "moejax_top_k": "MoejaxTopK"}  # name: symbol
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")
# GCC tuned for AMD Zen computes a lone multiply-add chain as multiply then add (a shorter loop-carried
# latency), other chains fused: a row would then round differently alone than beside others (gemm.h).
GCC_FLAGS = ("--param=avoid-fma-max-bits=0",)


@functools.cache
def _compiler() -> tuple[str, tuple[str, ...]]:
    """The C++ compiler and its flags."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return compiler, FLAGS + (() if "clang" in version else GCC_FLAGS)


def _library_path() -> Path:
    sources = b"".join(path.name.encode() + path.read_bytes() for path in sorted(SOURCES.iterdir()))
    key = hashlib.sha256(sources + " ".join(_compiler()[1]).encode() + jaxlib.__version__.encode()
                         + platform.machine().encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOEJAX_CACHE_DIR") or Path.home() / ".cache" / "moejax")
    return root / "kernels" / f"native-{key}.so"


def _build(library: Path) -> None:
    compiler, flags = _compiler()
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # built aside, then moved: concurrent builds are safe
        out = Path(tmp) / library.name
        command = [compiler, *flags, "-I", jax.ffi.include_dir(), *map(str, sorted(SOURCES.glob("*.cc"))), "-o", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, library)


@functools.cache
def available() -> bool:
    """Whether the native kernels are built (building them now if needed) and registered with XLA:CPU."""
    if os.environ.get("MOEJAX_NATIVE", "1") in ("0", ""):
        return False
    try:
        library = _library_path()
        if not library.exists():
            _build(library)
        loaded = ctypes.cdll.LoadLibrary(str(library))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        warnings.warn(f"moejax: native CPU kernels unavailable, using the jnp code ({e})", stacklevel=2)
        return False
    return True


def matmul(x: jax.Array, *weights: jax.Array) -> tuple[jax.Array, ...]:
    """x: [M, K] @ each weight [K, N_i], all float32 or all bfloat16 -> ([M, N_i] float32, ...), in one
    call; each row computed alone."""
    if not available():
        raise RuntimeError("the native CPU kernels are unavailable (see the warning above, or MOEJAX_NATIVE=0)")
    call = jax.ffi.ffi_call("moejax_matmul", [jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
                                              for w in weights])
    return tuple(call(x, *weights))


def top_k(x: jax.Array, k: int, argmax: bool = False) -> tuple[jax.Array, jax.Array]:
    """x: [M, N] float32 -> (values [M, k], indices [M, k] int32), as jax.lax.top_k; argmax (k = 1): the
    index jnp.argmax gives (top_k.cc: the orders)."""
    if not available():
        raise RuntimeError("the native CPU kernels are unavailable (see the warning above, or MOEJAX_NATIVE=0)")
    M = x.shape[0]
    call = jax.ffi.ffi_call("moejax_top_k", (jax.ShapeDtypeStruct((M, k), jnp.float32),
                                             jax.ShapeDtypeStruct((M, k), jnp.int32)))
    values, indices = call(x, k=np.int64(k), argmax=argmax)
    return values, indices


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array,
                    seq_ids: jax.Array, block_tables: jax.Array, *, scale: float,
                    window: int | None = None) -> jax.Array:
    """q: [T, H, hd]; caches: [num_blocks, block_size, KV, hd] of q's dtype (float32 or bfloat16);
    positions, seq_ids: [T]; block_tables: [S, max_blocks] -> [T, H, hd] float32."""
    if not available():
        raise RuntimeError("the native CPU kernels are unavailable (see the warning above, or MOEJAX_NATIVE=0)")
    call = jax.ffi.ffi_call("moejax_paged_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_cache, v_cache, positions.astype(jnp.int32), seq_ids.astype(jnp.int32),
                block_tables.astype(jnp.int32), scale=np.float32(scale), window=np.int64(window or 0))


ACTIVATION_CODES = {"silu": 0, "gelu": 1}  # a ClampedSwiGLU is 2 (moe_ffn.cc's Activation)


def moe_ffn(x: jax.Array, slot_ids: jax.Array, topk_weights: jax.Array, w_gate_up: jax.Array, w_down: jax.Array,
            activation: "reference.Activation" = "silu",
            b_gate_up: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x: [T, D], slot_ids: [T, K] (S or -1: no slot), topk_weights: [T, K], w_gate_up: [S, D, 2F],
    w_down: [S, F, D], b_gate_up: [S, 2F] or None, all of x's dtype (float32 or bfloat16)
    -> ([T, D] float32, rows per slot [S] int32)."""
    if not available():
        raise RuntimeError("the native CPU kernels are unavailable (see the warning above, or MOEJAX_NATIVE=0)")
    clamped = isinstance(activation, reference.ClampedSwiGLU)
    T, S = x.shape[0], w_gate_up.shape[0]
    bias = jnp.zeros((0,), x.dtype) if b_gate_up is None else b_gate_up.astype(x.dtype)
    call = jax.ffi.ffi_call("moejax_moe_ffn", (jax.ShapeDtypeStruct((T, x.shape[1]), jnp.float32),
                                               jax.ShapeDtypeStruct((S,), jnp.int32)))
    return call(x, slot_ids.astype(jnp.int32), topk_weights.astype(jnp.float32), w_gate_up.astype(x.dtype),
                w_down.astype(x.dtype), bias, activation=np.int64(2 if clamped else ACTIVATION_CODES[activation]),
                alpha=np.float32(activation.alpha if clamped else 0), limit=np.float32(activation.limit if clamped else 0))
