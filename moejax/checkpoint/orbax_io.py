"""Save and restore moejax models with orbax-checkpoint (sharded, restorable onto another sharding).

A saved model is a directory: `moejax_config.json` (the ModelConfig) and `params/` (orbax).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from moejax.checkpoint.safetensors_file import CheckpointError
from moejax.config import ModelConfig
from moejax.meshes.placement import Placements
from moejax.models.decoder import CausalLM
from moejax.models.model import Model, variable_sharding

CONFIG_FILE = "moejax_config.json"


def save_model(model: Model, directory: str | Path) -> Path:
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=1))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", nnx.to_pure_dict(model.params()), force=True)
        ckptr.wait_until_finished()
    return directory


def is_moejax_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def restore_model(directory: str | Path, *, placements: Placements = Placements()) -> Model:
    """Restore a saved model; each parameter lands directly in its sharding under `placements`."""
    directory = Path(directory).absolute()
    if not is_moejax_checkpoint(directory):
        raise CheckpointError(f"{directory}: not a moejax checkpoint (no {CONFIG_FILE})")
    cfg = ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    placements.validate(cfg)
    module = nnx.eval_shape(lambda: CausalLM(cfg, nnx.Rngs(0)))
    state = nnx.state(module, nnx.Param)
    abstract = jax.tree.map(
        lambda var: jax.ShapeDtypeStruct(tuple(var.shape), var.dtype, sharding=variable_sharding(var, placements)),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory / "params", nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(module, state)
    return Model(cfg, module, placements)
