"""Checkpoints: HF safetensors directories in, orbax checkpoints in and out."""

from __future__ import annotations

from pathlib import Path

from moejax.assets import shipped_checkpoint, shipped_names
from moejax.checkpoint.hf import CheckpointFiles, load_hf, load_tokenizer
from moejax.checkpoint.orbax_io import is_moejax_checkpoint, restore_model, save_model
from moejax.checkpoint.safetensors_file import CheckpointError
from moejax.config import PRESETS
from moejax.meshes import Layout, SplitLayout, get_layout
from moejax.meshes.placement import Placements, make_placements
from moejax.models.model import Model, build_model


def load_model(source: str | Path, *, dtype: str | None = None, seed: int = 0,
               layout: "str | Layout | SplitLayout | None" = None) -> tuple[Model, object | None]:
    """(model, tokenizer or None) from a preset name (random weights), a shipped checkpoint's name
    (moejax/assets), a moejax checkpoint or a HF checkpoint directory, with every parameter placed by
    `layout` on all of JAX's devices: a preset name, a .toml path or a Layout (one mesh), or an
    attention/experts SplitLayout (the routed experts on their own devices); default one device."""
    placements = placements_for(layout)
    if isinstance(source, str) and source in PRESETS:
        return build_model(PRESETS[source], seed=seed, dtype=dtype, placements=placements), None
    path = (isinstance(source, str) and shipped_checkpoint(source)) or Path(source)
    if not path.is_dir():
        raise CheckpointError(f"{source!r} is neither a model preset ({', '.join(sorted(PRESETS))}), "
                              f"a shipped checkpoint ({', '.join(shipped_names())}) nor a checkpoint directory")
    if is_moejax_checkpoint(path):
        model = restore_model(path, placements=placements)
    else:
        model = load_hf(path, dtype=dtype, placements=placements)
    return model, load_tokenizer(path)


def placements_for(layout: "str | Layout | SplitLayout | None", devices: list | None = None) -> Placements:
    """Placements of a layout given by name (a preset, split preset or .toml path) or as an object."""
    if isinstance(layout, str):
        from moejax.meshes import SPLIT_LAYOUTS, get_split_layout
        layout = get_split_layout(layout) if layout in SPLIT_LAYOUTS else get_layout(layout)
    return make_placements(layout, devices)


__all__ = ["CheckpointError", "CheckpointFiles", "load_hf", "load_model", "load_tokenizer",
           "placements_for", "restore_model", "save_model"]
