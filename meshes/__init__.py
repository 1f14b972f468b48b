"""moejax.meshes: device layouts and logical-axis rules."""

if __name__ == "meshes":  # the repo root is on sys.path: refuse to pose as a top-level package
    raise ImportError("moejax's meshes/ folder is importable only as moejax.meshes")

