"""Checkpoints: HF safetensors directories in, orbax checkpoints in and out."""

from __future__ import annotations

from pathlib import Path

from moejax.assets import shipped_checkpoint, shipped_names
from moejax.checkpoint.hf import CheckpointFiles, load_hf, load_tokenizer
from moejax.checkpoint.orbax_io import is_moejax_checkpoint, restore_model, save_model
from moejax.checkpoint.safetensors_file import CheckpointError
from moejax.config import PRESETS
from moejax.meshes import Layout, get_layout
from moejax.meshes.placement import Placement
from moejax.models.model import Model, build_model


def load_model(source: str | Path, *, dtype: str | None = None, seed: int = 0,
               layout: "str | Layout | None" = None) -> tuple[Model, object | None]:
    """(model, tokenizer or None) from a preset name (random weights), a shipped checkpoint's name
    (moejax/assets), a moejax checkpoint or a HF checkpoint directory, with every parameter placed by
    `layout` (a preset name, a .toml path or a Layout; default: one device) on all of JAX's devices."""
    placement = make_placement(layout)
    if isinstance(source, str) and source in PRESETS:
        return build_model(PRESETS[source], seed=seed, dtype=dtype, placement=placement), None
    path = (isinstance(source, str) and shipped_checkpoint(source)) or Path(source)
    if not path.is_dir():
        raise CheckpointError(f"{source!r} is neither a model preset ({', '.join(sorted(PRESETS))}), "
                              f"a shipped checkpoint ({', '.join(shipped_names())}) nor a checkpoint directory")
    sharding_for = None if placement is None else placement.layout.sharding_for(placement.mesh)
    if is_moejax_checkpoint(path):
        model = restore_model(path, sharding_for=sharding_for)
    else:
        model = load_hf(path, dtype=dtype, sharding_for=sharding_for)
    if placement is not None:
        placement.layout.validate(model.config, placement.mesh.size)
        model.placement = placement
    return model, load_tokenizer(path)


def make_placement(layout: "str | Layout | None", devices: list | None = None) -> Placement | None:
    """A layout on a mesh of `devices` (default: all devices, across processes); None for one device."""
    if layout is None:
        return None
    layout = get_layout(layout) if isinstance(layout, str) else layout
    if layout.num_devices == 1 and devices is None:
        return None
    return Placement(layout, layout.make_mesh(devices))


__all__ = ["CheckpointError", "CheckpointFiles", "load_hf", "load_model", "load_tokenizer",
           "make_placement", "restore_model", "save_model"]
