"""Paged attention as native code on XLA:CPU: kernels/native/paged_attention.cc, an XLA FFI custom
call built with the system's C++ compiler on first use and cached per source, jaxlib and machine.

On CPU, XLA lowers the per-row gather of KV blocks to an element-wise loop and the per-row attention
to tiny batched dots: at decode batch sizes that was most of a step. The native kernel streams each
row's blocks from the cache instead (same semantics as paged_attention.py's "rows" method, which it is
tested against). Where no compiler is found the jnp methods run, with one warning.

    MOEJAX_NATIVE_ATTENTION=0     never use it (the jnp methods run)
    MOEJAX_CACHE_DIR              where the built library is kept (default ~/.cache/moejax)
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

SOURCE = Path(__file__).with_name("native") / "paged_attention.cc"
TARGET = "moejax_paged_attention"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")


def _library_path() -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + jaxlib.__version__.encode()
                         + platform.machine().encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOEJAX_CACHE_DIR") or Path.home() / ".cache" / "moejax")
    return root / "kernels" / f"paged_attention-{key}.so"


def _build(library: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # built aside, then moved: concurrent builds are safe
        out = Path(tmp) / library.name
        command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, library)


@functools.cache
def available() -> bool:
    """Whether the native kernel is built (building it now if needed) and registered with XLA:CPU."""
    if os.environ.get("MOEJAX_NATIVE_ATTENTION", "1") in ("0", ""):
        return False
    library = _library_path()
    try:
        if not library.exists():
            _build(library)
        handler = ctypes.cdll.LoadLibrary(str(library)).MoejaxPagedAttention
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    except (OSError, RuntimeError) as e:
        warnings.warn(f"moejax: native CPU paged attention unavailable, using the jnp one ({e})", stacklevel=2)
        return False
    return True


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array,
                    seq_ids: jax.Array, block_tables: jax.Array, *, scale: float,
                    window: int | None = None) -> jax.Array:
    """q: [T, H, hd]; caches: [num_blocks, block_size, KV, hd] of q's dtype (float32 or bfloat16);
    positions, seq_ids: [T]; block_tables: [S, max_blocks] -> [T, H, hd] float32."""
    if not available():
        raise RuntimeError("the native CPU paged attention is unavailable (see the warning above, "
                           "or MOEJAX_NATIVE_ATTENTION=0)")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_cache, v_cache, positions.astype(jnp.int32), seq_ids.astype(jnp.int32),
                block_tables.astype(jnp.int32), scale=np.float32(scale), window=np.int64(window or 0))
