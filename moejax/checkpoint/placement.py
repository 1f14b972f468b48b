"""Where each parameter goes when it is loaded: the one hook layouts (meshes/) plug into."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

# (param path "layers.0.attn.w_q", its logical axes, its shape) -> where the array lives
ShardingFor = Callable[[str, tuple[str | None, ...], tuple[int, ...]], jax.sharding.Sharding]


def dotted(path: tuple) -> str:
    """('layers', 0, 'attn', 'w_q') -> 'layers.0.attn.w_q'."""
    return ".".join(str(getattr(p, "key", p)) for p in path)


def param_sharding(path: str, var: nnx.Variable, sharding_for: ShardingFor | None) -> jax.sharding.Sharding:
    shape = tuple(var.shape)
    if sharding_for is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    axes = var.get_metadata("out_sharding", None) or (None,) * len(shape)
    return sharding_for(path, tuple(axes), shape)
