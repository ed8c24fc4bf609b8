"""The model: LoRA layers and injection, adapter files, DDPM math, the frozen base, tiny test bases."""
