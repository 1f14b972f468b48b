"""Checkpoints shipped inside the package, loadable by name (`load_model("stdlib-moe")`).

Each is a directory here holding a HF checkpoint (config.json, safetensors, tokenizer); see
benchmarks/train_stdlib_moe.py for how `stdlib-moe` was trained.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def shipped_names() -> list[str]:
    """Names of the shipped checkpoints: the directories here that hold a config.json."""
    return sorted(p.parent.name for p in ASSETS_DIR.glob("*/config.json"))


def shipped_checkpoint(name: str) -> Path | None:
    """The directory of shipped checkpoint `name`, or None when there is no such checkpoint."""
    return ASSETS_DIR / name if name in shipped_names() else None
