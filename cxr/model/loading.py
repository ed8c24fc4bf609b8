"""Loading the frozen base model components with `from_pretrained` (hub id or local folder), and the model a
training run starts from (`load_for_training`: the components on the device, LoRA injected into the UNet)."""

from __future__ import annotations

import warnings

from cxr import DEFAULT_MODEL_ID

# The runwayml repo was removed from the hub; its weights live on under this id.
RENAMED_MODEL_IDS = {
    "runwayml/stable-diffusion-v1-5": DEFAULT_MODEL_ID,
}


def resolve_model_id(model_id: str) -> str:
    """Map a removed hub id to its current home, with a warning; anything else is returned as is."""
    new_id = RENAMED_MODEL_IDS.get(str(model_id).rstrip("/"))
    if new_id is None:
        return str(model_id)
    warnings.warn(
        f"{model_id!r} was removed from the Hugging Face hub; using {new_id!r} (same weights) instead.",
        stacklevel=2,
    )
    return new_id


def load_components(
    model_id: str, revision: str | None = None, names=("unet", "vae", "text_encoder", "tokenizer", "scheduler")
) -> dict:
    """Load SD components from a hub id or a local pipeline folder.

    Fails with a message saying what to do when the model cannot be found (no network, a typo, a
    folder that is not a diffusers pipeline).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model_id = resolve_model_id(model_id)
    loaders = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "scheduler": DDPMScheduler,  # only its config (betas, prediction type) is used for training
    }
    components = {}
    for name in names:
        try:
            components[name] = loaders[name].from_pretrained(model_id, subfolder=name, revision=revision)
        except (OSError, ValueError) as error:
            raise RuntimeError(
                f"could not load the {name} of {model_id!r}: {error}\n"
                "Give a local diffusers pipeline folder or a hub id you can download "
                "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5; log in with `hf auth login` if it is gated)."
            ) from error
    for name in ("unet", "vae", "text_encoder"):
        if name in components:
            components[name].eval().requires_grad_(False)
    return components


def load_for_training(cfg, device, dtype) -> tuple[dict, list[str]]:
    """The components of --model_id on `device` and the module paths LoRA was injected into: the UNet in `dtype`
    with LoRA (--lora_rank, --lora_alpha, --lora_targets, --lora_dropout; A initialised from --seed), the VAE in
    float32, the text encoder as loaded. `cfg` is a `cxr.config.TrainConfig`."""
    import torch

    from cxr.model.lora import inject_lora

    components = load_components(cfg.model_id, cfg.revision)
    unet = components["unet"].to(device=device, dtype=dtype)
    # The LoRA A init draws from --seed without touching the global RNG the caller (or a later run) relies on.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        paths = inject_lora(
            unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_target_list, dropout=cfg.lora_dropout
        )
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # The VAE stays float32: the cache stores its posterior exactly and validation decodes without fp16 overflow.
    components["vae"].to(device=device, dtype=torch.float32)
    components["text_encoder"].to(device=device)
    components["unet"] = unet
    return components, paths


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent cell along each side: 2 ** (VAE levels - 1), as diffusers' pipelines compute their
    `vae_scale_factor` (8 for SD v1.5)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def read_vae_scale_factor(model_id: str, revision: str | None = None) -> int:
    """`vae_scale_factor` of a base model's VAE, read from its config alone (no weights are loaded)."""
    from diffusers import AutoencoderKL

    with warnings.catch_warnings():  # load_components warns about a renamed hub id
        warnings.simplefilter("ignore")
        model_id = resolve_model_id(model_id)
    try:
        config = AutoencoderKL.load_config(model_id, subfolder="vae", revision=revision)
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"could not read the vae config of {model_id!r}: {error}\n"
            "Give a local diffusers pipeline folder or a hub id you can download "
            "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5; log in with `hf auth login` if it is gated)."
        ) from error
    return vae_scale_factor(config)


def pick_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device
