"""moejax.meshes: device layouts and logical-axis rules."""

if __name__ == "meshes":  # the repo root is on sys.path: refuse to pose as a top-level package
    raise ImportError("moejax's meshes/ folder is importable only as moejax.meshes")

from .layout import LOGICAL_AXES, Layout, LayoutError, SplitLayout  # noqa: E402
from .presets import LAYOUTS, SPLIT_LAYOUTS, get_layout, get_split_layout  # noqa: E402

__all__ = ["LAYOUTS", "LOGICAL_AXES", "Layout", "LayoutError", "SPLIT_LAYOUTS", "SplitLayout",
           "get_layout", "get_split_layout"]
