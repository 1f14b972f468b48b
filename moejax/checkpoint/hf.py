"""Load a HF checkpoint directory into a moejax Model, streaming each tensor into its sharding.

No parameter is ever whole in host memory twice: the safetensors files are memory-mapped, and every
device shard is read (and converted to the target dtype) from the exact rows it needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.checkpoint.hf_mapping import Source, dotted, ignored, param_sources
from moejax.checkpoint.safetensors_file import CheckpointError, SafetensorsFile
from moejax.config import ModelConfig, load_hf_config
from moejax.models.decoder import CausalLM
from moejax.meshes.placement import Placements
from moejax.models.model import Model, variable_sharding

class CheckpointFiles:
    """The tensors of a checkpoint directory: one `model.safetensors`, or shards listed by
    `model.safetensors.index.json`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index_path = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        self._where: dict[str, SafetensorsFile] = {}
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
            files: dict[str, SafetensorsFile] = {}
            for name, filename in weight_map.items():
                if filename not in files:
                    if not (self.directory / filename).is_file():
                        raise CheckpointError(f"{index_path}: tensor {name!r} is in {filename}, "
                                              "which does not exist")
                    files[filename] = SafetensorsFile(self.directory / filename)
                if name not in files[filename].keys():
                    raise CheckpointError(f"{index_path}: tensor {name!r} is listed in {filename} "
                                          "but that file does not contain it")
                self._where[name] = files[filename]
        elif single.is_file():
            f = SafetensorsFile(single)
            self._where = {name: f for name in f.keys()}
        else:
            present = sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []
            raise CheckpointError(f"{self.directory}: no model.safetensors or model.safetensors.index.json "
                                  f"(found: {', '.join(present) or 'nothing'})")

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].tensor(name)


def _check(files: CheckpointFiles, sources: dict[str, Source], shapes: dict[str, tuple[int, ...]],
           cfg: ModelConfig) -> None:
    """Every tensor the model needs is there with the right shape, and nothing else is."""
    needed: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path, source in sources.items():
        for name, shape in source.expected_shapes(shapes[path]).items():
            needed[name] = (path, shape)
    missing = sorted(set(needed) - files.names)
    if missing:
        shown = "; ".join(f"{n} (for {needed[n][0]}, shape {list(needed[n][1])})" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{files.directory}: missing tensor{'s' if len(missing) > 1 else ''}: {shown}{more}")
    unexpected = sorted(n for n in files.names - set(needed) if not ignored(cfg, n))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{files.directory}: unexpected tensor{'s' if len(unexpected) > 1 else ''} "
                              f"for a {cfg.architecture} model with this config: {', '.join(unexpected[:5])}{more}")
    for name, (path, shape) in needed.items():
        if tuple(files.shape(name)) != tuple(shape):
            raise CheckpointError(f"{files.directory}: tensor {name} has shape {list(files.shape(name))}, "
                                  f"expected {list(shape)} (for {path}, from config.json)")


def load_hf(directory: str | Path, *, dtype: str | None = None, placements: Placements = Placements()) -> Model:
    """A Model from a HF checkpoint directory (config.json + safetensors), in `dtype` (default:
    the checkpoint's), each parameter placed by `placements` (default: the first device)."""
    cfg = load_hf_config(directory)
    if dtype:
        cfg = cfg.replace(dtype=dtype)
    placements.validate(cfg)
    files = CheckpointFiles(directory)
    target_dtype = jnp.dtype(cfg.dtype)
    module = nnx.eval_shape(lambda: CausalLM(cfg, nnx.Rngs(0), dtype=target_dtype))
    state = nnx.state(module, nnx.Param)
    variables = {dotted(p): v for p, v in nnx.to_flat_state(state)}
    sources = param_sources(cfg, files.names)
    assert set(sources) == set(variables), set(sources) ^ set(variables)  # mapping covers the model
    _check(files, sources, {p: tuple(v.shape) for p, v in variables.items()}, cfg)

    for path, var in variables.items():
        source = sources[path]
        var.set_value(jax.make_array_from_callback(  # in the parameter's dtype: the model's, or fp32 where it keeps one
            tuple(var.shape), variable_sharding(var, placements),
            lambda index, source=source, dtype=var.dtype: np.ascontiguousarray(source.read(files.get, index), dtype=dtype)))
    nnx.update(module, state)
    return Model(cfg, module, placements)


def load_tokenizer(directory: str | Path):
    """The checkpoint's `tokenizer.json` as a `tokenizers.Tokenizer`, or None when there is none.

    Raises a clear error when the file exists but the optional `tokenizers` package is missing."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError(f"{path} needs the `tokenizers` package: pip install 'moejax[tokenizer]'") from None
    return Tokenizer.from_file(str(path))
