"""cxr: LoRA fine-tuning of the Stable Diffusion v1.5 UNet on normal chest X-rays, and sampling from it.

Importing the package is cheap: no torch/diffusers import happens here, so `python -m cxr.demo`
can bootstrap an environment with only the standard library.
"""

__version__ = "0.1.0"

DEFAULT_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_PROMPT = "chest x-ray, normal"
