"""3D outputs: triangle meshes as glb, obj, stl or ply (trimesh), and turntable GIFs."""

from __future__ import annotations

import io

import numpy as np
import trimesh
from PIL import Image

MESH_FORMATS = ("glb", "obj", "stl", "ply")
# glTF is y-up by its specification; Shap-E's meshes are z-up (as obj, stl and ply viewers
# mostly assume): a glb is turned a quarter round the x axis so that it stands upright.
_Z_UP_TO_Y_UP = trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0])


def encode_mesh(
    vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None, fmt: str
) -> bytes:
    """A triangle mesh in `fmt` (one of MESH_FORMATS). `colors`: per-vertex RGB in 0..1; stl
    has no colours and drops them."""
    if fmt not in MESH_FORMATS:
        raise ValueError(f"unknown mesh format {fmt!r}")
    vertex_colors = None
    if colors is not None:
        rgb = (np.clip(colors, 0.0, 1.0) * 255).round().astype(np.uint8)
        vertex_colors = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    mesh = trimesh.Trimesh(
        vertices=np.asarray(vertices, np.float64),
        faces=np.asarray(faces, np.int64),
        vertex_colors=vertex_colors,
        process=False,  # keep the marching-cubes vertices as they are (merging is slow)
    )
    if fmt == "glb":
        mesh.apply_transform(_Z_UP_TO_Y_UP)
    data = mesh.export(file_type=fmt)
    return data.encode() if isinstance(data, str) else data


def encode_turntable_gif(frames: list[Image.Image], seconds: float) -> bytes:
    """The frames as one looping GIF lasting `seconds` (GIF timing is in 10 ms steps)."""
    buffer = io.BytesIO()
    duration = max(20, round(seconds * 1000 / len(frames) / 10) * 10)
    frames[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=duration,
        loop=0,
        disposal=2,
    )
    return buffer.getvalue()


def turntable_video_frames(
    frames: list[Image.Image], seconds: float, fps: int
) -> list[Image.Image]:
    """`fps × seconds` frames going once round the turntable, for an MP4 of that length."""
    count = max(1, round(fps * seconds))
    indices = (np.arange(count) * len(frames) // count).tolist()
    return [frames[i] for i in indices]
