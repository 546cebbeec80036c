"""LoRA and LyCORIS adapters on a resident pipeline: loaded once, weighted per job."""

from __future__ import annotations

from diffusers import DiffusionPipeline

from sdserve.engine.registry import ModelRegistry
from sdserve.errors import EngineError


def apply_loras(
    pipe: DiffusionPipeline, loras: list[tuple[str, float]], registry: ModelRegistry
) -> None:
    """Load each LoRA once per pipeline (kept as a named adapter), then set this job's weights."""
    loaded = {name for names in pipe.get_list_adapters().values() for name in names}
    lycoris = pipe.__dict__.setdefault("_sdserve_lycoris", set())
    wanted = {_adapter_name(lora_id): registry.resolve_lora(lora_id) for lora_id, _ in loras}
    wanted_lycoris = {name for name, path in wanted.items() if _lycoris_kind(path)}
    if (lycoris or wanted_lycoris) and loaded - set(wanted):
        # PEFT cannot stack LoRA and LoHa/LoKr layers on one module: start from a clean UNet.
        pipe.unload_lora_weights()
        loaded = set()
        lycoris.clear()
    if not loras:
        if loaded:
            pipe.disable_lora()
        return
    for name, path in wanted.items():
        if name in loaded:
            continue
        try:
            if name in wanted_lycoris:
                _load_lycoris(pipe, path, name)
                lycoris.add(name)
            else:
                pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:
            raise EngineError(f"LoRA {path.stem} could not be loaded: {exc}") from exc
    pipe.enable_lora()
    pipe.set_adapters(list(wanted), adapter_weights=[strength for _, strength in loras])


def _lycoris_kind(path) -> str | None:
    """loha / lokr for LyCORIS adapters trained here (PEFT layout), else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            kind = (handle.metadata() or {}).get("sdserve_adapter")
    except Exception:  # not safetensors: let load_lora_weights say what is wrong
        return None
    return kind if kind in ("loha", "lokr") else None


def _load_lycoris(pipe: DiffusionPipeline, path, name: str) -> None:
    """diffusers' loader reads LoRA only; LoHa / LoKr go in through PEFT's own adapter classes."""
    from peft import LoHaConfig, LoKrConfig, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = {
        k.removeprefix("unet."): v for k, v in load_file(path).items() if k.startswith("unet.")
    }
    marker = ".hada_" if metadata["sdserve_adapter"] == "loha" else ".lokr_"
    targets = sorted({key.split(marker)[0] for key in state})
    rank = int(metadata["rank"])
    config_class = LoHaConfig if metadata["sdserve_adapter"] == "loha" else LoKrConfig
    pipe.unet.add_adapter(
        config_class(r=rank, alpha=rank, target_modules=targets), adapter_name=name
    )
    set_peft_model_state_dict(pipe.unet, state, adapter_name=name)


def _adapter_name(lora_id: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in lora_id)
