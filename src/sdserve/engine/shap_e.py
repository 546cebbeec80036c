"""Shap-E models for the 3D family: which ids exist, the built-in tiny pair, loading, and the
marching-cubes tables a renderer needs to make meshes.

`ShapERenderer.mesh_decoder` holds its marching-cubes lookup tables as checkpoint buffers: the
hub's `openai/shap-e` has them, but a renderer built from a config has zeros there and
`decode_to_mesh` finds no faces. The tables are computed once (`python -m sdserve.engine.shap_e
tables`, with scikit-image) and shipped in `configs/shap_e/marching_cubes.json`; every loaded
renderer whose tables are empty gets them from that file.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import HeunDiscreteScheduler, PriorTransformer, ShapEImg2ImgPipeline, ShapEPipeline
from diffusers.pipelines.shap_e.renderer import ShapERenderer

from sdserve.engine import tiny
from sdserve.engine.availability import hub_cached, is_offline
from sdserve.errors import ModelMismatch, ModelNotFound, ModelUnavailable
from sdserve.settings import Settings

Task = Literal["text", "image"]
TINY_TEXT = "tiny-shap-e"
TINY_IMAGE = "tiny-shap-e-img2img"
# The hosted API's Shap-E ids and the hub repos they name (the same strings).
HUB_MODELS: dict[str, Task] = {"openai/shap-e": "text", "openai/shap-e-img2img": "image"}
TINY_MODELS: dict[str, Task] = {TINY_TEXT: "text", TINY_IMAGE: "image"}
_PIPELINE_TASKS: dict[str, Task] = {"ShapEPipeline": "text", "ShapEImg2ImgPipeline": "image"}
_TABLES = Path(__file__).parent / "configs" / "shap_e" / "marching_cubes.json"
_SEED = 0

# Shap-E's cube corners are numbered c = x + 2y + 4z; its 12 edges, in index order.
CUBE_EDGES = (
    (0, 1), (2, 3), (4, 5), (6, 7),  # along x
    (0, 2), (1, 3), (4, 6), (5, 7),  # along y
    (0, 4), (1, 5), (2, 6), (3, 7),  # along z
)  # fmt: skip


@dataclass(frozen=True)
class ShapESource:
    """Where a 3D model id lives: built in (tiny), a hub repo, or a diffusers folder."""

    model_id: str
    task: Task  # text (ShapEPipeline) or image (ShapEImg2ImgPipeline)
    kind: Literal["builtin", "hub", "folder"]
    location: str

    @property
    def tiny(self) -> bool:
        return self.kind == "builtin"


def resolve(model_id: str, settings: Settings) -> ShapESource:
    """The Shap-E model `model_id` names; ModelNotFound for ids that are no Shap-E model here,
    ModelUnavailable for hub ids that an offline server has not downloaded."""
    if model_id in TINY_MODELS:
        return ShapESource(model_id, TINY_MODELS[model_id], "builtin", model_id)
    folder = settings.models_dir / model_id
    index = folder / "model_index.json"
    if ".." not in model_id and index.is_file():
        class_name = json.loads(index.read_text()).get("_class_name", "")
        if class_name in _PIPELINE_TASKS:
            return ShapESource(model_id, _PIPELINE_TASKS[class_name], "folder", str(folder))
        raise ModelMismatch(
            f"Model {model_id} is a {class_name or 'non-Shap-E'}, not a Shap-E model."
        )
    if model_id in HUB_MODELS:
        if is_offline(settings) and not hub_cached(model_id):
            raise ModelUnavailable(
                f"Model {model_id} (on the Hugging Face hub) is not downloaded and this server is "
                f"offline. On a machine with internet access run `huggingface-cli download "
                f"{model_id}`, or put its diffusers folder at {folder}. The built-in "
                f"{TINY_TEXT} / {TINY_IMAGE} work offline (random weights: boxes)."
            )
        return ShapESource(model_id, HUB_MODELS[model_id], "hub", model_id)
    raise ModelNotFound(model_id)


def load(source: ShapESource, settings: Settings, device: torch.device, dtype: torch.dtype):
    """The source's pipeline on `device`, its renderer's marching-cubes tables filled in."""
    cls = ShapEPipeline if source.task == "text" else ShapEImg2ImgPipeline
    try:
        if source.kind == "builtin":
            location = str(ensure_tiny(source.model_id, settings.models_dir))
        else:
            location = source.location
        pipe = cls.from_pretrained(
            location, dtype=dtype, local_files_only=source.kind != "hub" or is_offline(settings)
        )
    except Exception as exc:
        raise ModelUnavailable(f"Model {source.model_id} could not be loaded: {exc}") from exc
    fill_marching_cubes(pipe.shap_e_renderer)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---- marching cubes -----------------------------------------------------------------------------


@functools.cache
def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    triangles = json.loads(_TABLES.read_text())["cases"]
    cases = torch.zeros(256, 5, 3, dtype=torch.long)
    masks = torch.zeros(256, 5, dtype=torch.bool)
    for case, tris in enumerate(triangles):
        for j, tri in enumerate(tris):
            cases[case, j] = torch.tensor(tri)
            masks[case, j] = True
    return cases, masks


def fill_marching_cubes(renderer: ShapERenderer) -> None:
    """Give a renderer built from a config (zeros) the shipped marching-cubes tables."""
    decoder = renderer.mesh_decoder
    if bool(decoder.masks.any()):
        return  # a checkpoint's own tables
    cases, masks = _tables()
    decoder.cases.copy_(cases.to(decoder.cases.device))
    decoder.masks.copy_(masks.to(decoder.masks.device))


def compute_marching_cubes_tables() -> list[list[list[int]]]:
    """Per corner state (bit c set: corner c is inside, field > 0), its triangles as Shap-E edge
    indices, wound so that normals point out (Shap-E's order). Needs scikit-image."""
    import numpy as np
    from skimage.measure import marching_cubes

    def corner(c: int) -> np.ndarray:
        return np.array([c & 1, (c >> 1) & 1, (c >> 2) & 1], float)

    edge_at = {tuple((corner(a) + corner(b)) / 2): i for i, (a, b) in enumerate(CUBE_EDGES)}
    table: list[list[list[int]]] = [[]]
    for case in range(1, 255):
        field = np.empty((2, 2, 2))
        for c in range(8):
            field[tuple(corner(c).astype(int))] = 1.0 if case >> c & 1 else -1.0
        verts, faces, _, _ = marching_cubes(field, 0.0, method="lorensen")
        # ±1 corners put every vertex on an edge midpoint. skimage winds the other way round.
        table.append([[edge_at[tuple(np.round(verts[i], 6))] for i in tri[::-1]] for tri in faces])
    return [*table, []]


# ---- the built-in tiny models ---------------------------------------------------------------


def _renderer() -> ShapERenderer:
    renderer = ShapERenderer(
        param_shapes=((8, 93), (8, 8), (8, 8), (8, 8)),
        d_latent=16,
        d_hidden=8,
        n_output=12,
        background=(0.1, 0.1, 0.1),
    )
    # A random signed distance never crosses zero on its own: a constant inside (0.5) makes the
    # mesh the grid's closed box (the renderer pads the grid with -1).
    with torch.no_grad():
        renderer.mlp.mlp[-1].weight[0].zero_()
        renderer.mlp.mlp[-1].bias[0] = 0.5
    fill_marching_cubes(renderer)
    return renderer


def _prior(image: bool) -> PriorTransformer:
    return PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=16,
        embedding_dim=16,
        num_embeddings=32,  # the renderer's param_shapes rows
        embedding_proj_dim=16,
        time_embed_dim=64,
        num_layers=1,
        clip_embed_dim=32,
        additional_embeddings=0,
        time_embed_act_fn="gelu",
        norm_in_type="layer",
        encoder_hid_proj_type=None,
        added_emb_type=None,
        **({"embedding_proj_norm_type": "layer"} if image else {}),
    )


def _scheduler() -> HeunDiscreteScheduler:
    return HeunDiscreteScheduler(
        beta_schedule="exp",
        num_train_timesteps=1024,
        prediction_type="sample",
        use_karras_sigmas=True,
        clip_sample=True,
        clip_sample_range=1.0,
    )


def _build_tiny_text(tmp: Path) -> ShapEPipeline:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdserve.engine.tiny import write_char_tokenizer

    torch.manual_seed(_SEED)
    tokenizer = write_char_tokenizer(tmp / "tokenizer")
    vocab = len(tokenizer)
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            hidden_size=16,
            projection_dim=16,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab,
        )
    )
    return ShapEPipeline(
        prior=_prior(image=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        shap_e_renderer=_renderer(),
        scheduler=_scheduler(),
    )


def _build_tiny_image(_tmp: Path) -> ShapEImg2ImgPipeline:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(_SEED)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            image_size=224,  # the processor's crop must be the encoder's image size
            patch_size=32,
            projection_dim=16,
            intermediate_size=24,
            num_attention_heads=2,
            num_hidden_layers=2,
        )
    )
    processor = CLIPImageProcessor(
        crop_size=224,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
        size=224,
    )
    return ShapEImg2ImgPipeline(
        prior=_prior(image=True),
        image_encoder=image_encoder,
        image_processor=processor,
        shap_e_renderer=_renderer(),
        scheduler=_scheduler(),
    )


_BUILDERS = {TINY_TEXT: _build_tiny_text, TINY_IMAGE: _build_tiny_image}


def ensure_tiny(model_id: str, models_dir: Path) -> Path:
    """Build the tiny model into `models_dir/model_id` once; return the diffusers folder."""
    folder = models_dir / model_id
    if (folder / "model_index.json").exists():
        return folder

    def write(target: Path) -> None:
        _BUILDERS[model_id](target.parent / "tokenizers").save_pretrained(target)

    return tiny.publish_once(folder, write)


if __name__ == "__main__":  # `python -m sdserve.engine.shap_e tables` rewrites the shipped file
    if sys.argv[1:] != ["tables"]:
        sys.exit("usage: python -m sdserve.engine.shap_e tables")
    cases = compute_marching_cubes_tables()
    _TABLES.write_text(
        json.dumps(
            {
                "about": "Marching-cubes triangles per corner state for diffusers' ShapERenderer "
                "mesh_decoder (cases/masks buffers): corner c = x + 2y + 4z is inside when bit c "
                "is set; triangles are edge indices (see CUBE_EDGES), normals out. Made by "
                "`python -m sdserve.engine.shap_e tables` (scikit-image, Lorensen).",
                "cases": cases,
            },
            separators=(",", ":"),
        )
        + "\n"
    )
    print(f"{_TABLES}: {sum(map(len, cases))} triangles")
