"""The CUDA path of training: no host sync in the step, CUDA-graph replay equal to the eager step, train.py's
--cuda_graph and --torch_compile end to end. Skipped without a GPU.

Written in sessions without a GPU, so these have not run yet. On a GPU machine:
    python -m pytest -q tests/test_cuda.py
"""

import pytest
import torch
from helpers import lora_tensors  # tests/helpers.py
from helpers import train_cfg as make_cfg

import cxr.train.step
from cxr.config import TrainConfig
from cxr.train import training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Replay runs the eager step's kernels, but some CUDA backward kernels (attention) accumulate with atomics, so
# results can differ at rounding level; AdamW can turn such a difference into an lr-sized one (lr = 1e-3) where a
# gradient is near zero. The tolerances below are a first guess: calibrate them on the first GPU run.
ATOL = 1e-4


def _cuda_step(tiny_model_dir, generator, capturable: bool):
    """The training step (cxr.train.step.build_train_step) on the tiny UNet with LoRA (same init every call) and random
    'cached' latents, on CUDA. `capturable`: built as --cuda_graph builds it (capturable AdamW, the default CUDA
    generator seeded with --seed); otherwise with its own generator, whose state is set to `generator`'s."""
    from cxr.model import ddpm
    from cxr.model.loading import load_components
    from cxr.model.lora import inject_lora, lora_parameters

    device = torch.device("cuda")
    parts = load_components(str(tiny_model_dir), names=("unet", "scheduler"))
    torch.manual_seed(0)  # the LoRA A init, on the CPU
    inject_lora(parts["unet"], rank=4, alpha=4)
    unet = parts["unet"].to(device)
    latents = torch.Generator().manual_seed(1)
    mean, std = torch.randn(8, 4, 8, 8, generator=latents).to(device), torch.full((8, 4, 8, 8), 0.1, device=device)
    cfg = TrainConfig(
        learning_rate=1e-3,
        adam_weight_decay=0.01,
        train_batch_size=2,
        grad_accum_steps=2,
        snr_gamma=5.0,
        noise_offset=0.05,
        max_grad_norm=1.0,
        mixed_precision="no",
        seed=0,
        cuda_graph=capturable,
    )
    step = cxr.train.step.build_train_step(
        cfg,
        model=unet,
        params=lora_parameters(unet),
        schedule=ddpm.make_schedule(dict(parts["scheduler"].config), device),
        latents_mean=mean,
        latents_std=std,
        scaling_factor=0.18215,
        prompt_embeds=torch.randn(1, 77, 32, generator=latents).to(device),
    )
    if not capturable:
        step.generator.set_state(generator.get_state())
    return unet, step, step.params, step.optimizer, step.metrics


def _indices(count: int) -> list[torch.Tensor]:
    order = torch.Generator().manual_seed(2)
    return [torch.randperm(8, generator=order)[:4].view(2, 2).cuda() for _ in range(count)]


def test_step_makes_no_host_sync_on_cuda(tiny_model_dir):
    _, step, _, _, metrics = _cuda_step(tiny_model_dir, torch.Generator(device="cuda").manual_seed(0), False)
    indices = _indices(2)
    step(indices[0])  # the first step creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call (.item(), D2H copy, nonzero...) raises
    try:
        step(indices[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(metrics.loss_sum).item() and metrics.grad_norm_sum.item() > 0


def test_cuda_graph_replay_equals_the_eager_step(tiny_model_dir):
    from cxr.model.lora import lora_state_dict

    indices = _indices(3)
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    results = []
    for graphed in (False, True):
        generator.manual_seed(0)
        unet, step, params, optimizer, metrics = _cuda_step(tiny_model_dir, generator, capturable=True)
        if graphed:
            step.capture_cuda_graph(indices[0])
        for rows in indices:
            step(rows)
        torch.cuda.synchronize()
        results.append((lora_state_dict(unet), metrics.loss_sum.item()))
    (eager, eager_loss), (graph, graph_loss) = results
    assert any(eager[k].abs().sum() > 0 for k in eager if "lora_B" in k)  # the steps did train
    for key in eager:
        torch.testing.assert_close(graph[key], eager[key], atol=ATOL, rtol=1e-4)
    assert graph_loss == pytest.approx(eager_loss, rel=1e-4)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_train_with_cuda_graph_matches_eager_train(tiny_model_dir, phantom_dir, tmp_path, precision):
    common = dict(device="cuda", mixed_precision=precision, max_train_steps=4, checkpointing_steps=4)
    eager = training.train(make_cfg(tiny_model_dir, phantom_dir, tmp_path / "eager", tmp_path / "cache", **common))
    graph = training.train(
        make_cfg(tiny_model_dir, phantom_dir, tmp_path / "graph", tmp_path / "cache", cuda_graph=True, **common)
    )
    assert eager["steps"] == graph["steps"] == 4
    a, b = lora_tensors(tmp_path / "eager" / "lora_unet"), lora_tensors(tmp_path / "graph" / "lora_unet")
    tolerance = ATOL if precision == "no" else 1e-3
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=tolerance, rtol=1e-3)


def test_train_with_torch_compile_gives_the_eager_first_step_loss(tiny_model_dir, phantom_dir, tmp_path):
    """Same weights, data and noise: the compiled UNet's first training loss equals the eager one. (Weights after
    several AdamW steps are not compared: AdamW turns rounding-level gradient differences into lr-sized ones.)"""
    common = dict(device="cuda", mixed_precision="no", max_train_steps=1, checkpointing_steps=1, log_every=1)
    eager = training.train(make_cfg(tiny_model_dir, phantom_dir, tmp_path / "eager", tmp_path / "cache", **common))
    compiled = training.train(
        make_cfg(tiny_model_dir, phantom_dir, tmp_path / "compiled", tmp_path / "cache", torch_compile=True, **common)
    )
    assert compiled["steps"] == 1
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-3)
