"""Checkpoints: HF safetensors directories in, orbax checkpoints in and out."""

from __future__ import annotations

from pathlib import Path

from moejax.checkpoint.hf import CheckpointFiles, load_hf, load_tokenizer
from moejax.checkpoint.orbax_io import is_moejax_checkpoint, restore_model, save_model
from moejax.checkpoint.placement import ShardingFor
from moejax.checkpoint.safetensors_file import CheckpointError
from moejax.config import PRESETS
from moejax.models.model import Model, build_model


def load_model(source: str | Path, *, dtype: str | None = None, seed: int = 0,
               sharding_for: ShardingFor | None = None) -> tuple[Model, object | None]:
    """(model, tokenizer or None) from a preset name (random weights), a moejax checkpoint or a HF
    checkpoint directory."""
    if isinstance(source, str) and source in PRESETS:
        cfg = PRESETS[source]
        return build_model(cfg, seed=seed, dtype=dtype), None
    path = Path(source)
    if not path.is_dir():
        raise CheckpointError(f"{source!r} is neither a model preset ({', '.join(sorted(PRESETS))}) "
                              "nor a checkpoint directory")
    if is_moejax_checkpoint(path):
        model = restore_model(path, sharding_for=sharding_for)
    else:
        model = load_hf(path, dtype=dtype, sharding_for=sharding_for)
    return model, load_tokenizer(path)


__all__ = ["CheckpointError", "CheckpointFiles", "load_hf", "load_model", "load_tokenizer",
           "restore_model", "save_model"]
