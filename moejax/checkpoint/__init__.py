"""Checkpoints: HF safetensors directories in, orbax checkpoints in and out."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from moejax.assets import shipped_checkpoint, shipped_names
from moejax.checkpoint.hf import CheckpointFiles, load_hf, load_tokenizer
from moejax.checkpoint.orbax_io import is_moejax_checkpoint, restore_model, save_model
from moejax.checkpoint.safetensors_file import CheckpointError
from moejax.config import PRESETS, ConfigError, ModelConfig, check_dtype, load_hf_config
from moejax.meshes import Layout, SplitLayout, get_layout
from moejax.meshes.placement import Placements, make_placements
from moejax.models.model import Model, build_model


def load_model(source: str | Path, *, dtype: str | None = None, seed: int = 0,
               layout: "str | Layout | SplitLayout | None" = None) -> tuple[Model, object | None]:
    """(model, tokenizer or None) from a preset name (random weights), a shipped checkpoint's name
    (moejax/assets), a moejax checkpoint or a HF checkpoint directory, with every parameter placed by
    `layout` on all of JAX's devices: a preset name, a .toml path or a Layout (one mesh), or an
    attention/experts SplitLayout (the routed experts on their own devices); default one device."""
    check_dtype(dtype)
    placements = placements_for(layout)
    if isinstance(source, str) and source in PRESETS:
        check_fits_memory(PRESETS[source], dtype, placements)
        return build_model(PRESETS[source], seed=seed, dtype=dtype, placements=placements), None
    path = checkpoint_dir(source)
    if path is None:
        raise CheckpointError(f"{source!r} is neither a model preset ({', '.join(sorted(PRESETS))}), "
                              f"a shipped checkpoint ({', '.join(shipped_names())}) nor a checkpoint directory")
    if is_moejax_checkpoint(path):
        model = restore_model(path, placements=placements)
    else:
        check_fits_memory(load_hf_config(path), dtype, placements)
        model = load_hf(path, dtype=dtype, placements=placements)
    return model, load_tokenizer(path)


def checkpoint_dir(source: str | Path) -> Path | None:
    """The directory of a shipped checkpoint's name or a checkpoint path; None for anything else."""
    path = (isinstance(source, str) and shipped_checkpoint(source)) or Path(source)
    return path if path.is_dir() else None


def check_fits_memory(cfg: ModelConfig, dtype: str | None, placements: Placements) -> None:
    """Refuse, before allocating anything, weights that cannot fit: this process's share of them
    against the free memory of its devices (host RAM for CPU devices, which share it)."""
    from moejax.engine.traffic import model_bytes

    need = model_bytes(cfg.replace(dtype=dtype) if dtype else cfg)
    devices = {d for p in (placements.attention, placements.experts) if p is not None for d in p.mesh.devices.flat}
    devices = devices or {jax.local_devices()[0]}
    local = [d for d in devices if d.process_index == jax.process_index()]
    share = need * len(local) // len(devices)  # weights are split over the devices (at most evenly)
    if local[0].platform == "cpu":
        free, where = _host_available_bytes(), "of host memory is available"
    else:
        stats = local[0].memory_stats() or {}
        if "bytes_limit" not in stats:
            return
        free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * len(local)
        where = f"is free on {len(local)} {local[0].platform} device{'s' if len(local) > 1 else ''}"
    if free is not None and share > free:
        raise ConfigError(f"{cfg.name} needs {share / 2**30:.1f} GiB for its weights "
                          f"({dtype or cfg.dtype}, {len(local)} of {len(devices)} devices on this process), "
                          f"but {free / 2**30:.1f} GiB {where}: use a smaller model, a layout over more "
                          "devices or hosts, or simulate it (moejax simulate --model ... --hardware ...)")


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None


def placements_for(layout: "str | Layout | SplitLayout | None", devices: list | None = None) -> Placements:
    """Placements of a layout given by name (a preset, split preset or .toml path) or as an object."""
    if isinstance(layout, str):
        from moejax.meshes import SPLIT_LAYOUTS, get_split_layout
        layout = get_split_layout(layout) if layout in SPLIT_LAYOUTS else get_layout(layout)
    return make_placements(layout, devices)


__all__ = ["CheckpointError", "CheckpointFiles", "check_fits_memory", "checkpoint_dir", "load_hf", "load_model",
           "load_tokenizer",
           "placements_for", "restore_model", "save_model"]
