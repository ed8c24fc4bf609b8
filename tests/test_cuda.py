"""What the CUDA path of training must do, checked on a CUDA GPU (every test is skipped without one):

- the training step makes no host synchronisation;
- one step replayed from a CUDA graph gives the eager step's loss and gradients at SD v1.5 shapes (random
  weights, batch 2, bf16 autocast: the attention kernels training runs, head dims 40, 80 and 160);
- a replay reads no freed memory after the step lets go of what it read at the capture (the replay holds it);
- the LR set between two replays is the LR the replay applies (AdamW's update in closed form);
- a step whose loss is NaN, replayed from a graph, leaves the LoRA weights, AdamW's moments and its step count
  as they were, and is counted as non-finite;
- a run stopped half way and resumed equals the straight run bit for bit (tiny model, eager and CUDA graph,
  under deterministic algorithms: the attention and convolution backward kernels are not deterministic
  otherwise);
- the first training loss under bf16 autocast (bf16 base weights, as train() runs them) is within 1e-2
  (relative) of the float32 loss at SD v1.5 shapes.

    python -m pytest -q tests/test_cuda.py
"""

import copy
import math
import os

# cuBLAS reads this when it first creates a handle: set before any test runs a matmul, for the deterministic tests.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import train_cfg as make_cfg  # noqa: E402  (tests/helpers.py)

from cxr.config import TrainConfig  # noqa: E402
from cxr.model import ddpm  # noqa: E402
from cxr.model.lora import inject_lora, lora_parameters  # noqa: E402
from cxr.model.tiny import SD15_SCHEDULER_CONFIG, build_components  # noqa: E402
from cxr.perf.gpucheck import cuda_graph_value  # noqa: E402
from cxr.perf.gpucheck_children import built_on, train_step  # noqa: E402
from cxr.train import training  # noqa: E402
from cxr.train.checkpoint import load_checkpoint  # noqa: E402
from cxr.train.step import set_lr  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _unet(arch: str) -> torch.nn.Module:
    """The `arch` UNet with random weights, float32, on the GPU (built there: SD v1.5 on the CPU takes longer)."""
    return built_on("cuda", lambda: build_components(arch, seed=0))["unet"].cuda()


@pytest.fixture(scope="module")
def sd15_unet():
    return _unet("sd15")


@pytest.fixture(scope="module")
def tiny_unet():
    return _unet("tiny")


def _with_lora(base: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `base` in `dtype` with LoRA (float32, the same A init every call), in training mode."""
    unet = copy.deepcopy(base).to(dtype)
    torch.manual_seed(0)
    inject_lora(unet, rank=16, alpha=16)
    return unet.train()


def _step(unet, *, graph: bool, precision: str = "bf16", rows: int = 8, batch: int = 2):
    """(step, latents_mean): our step (as train() builds it) over `rows` random cached latents
    of 256 px images (4x32x32), with the CUDA graph forced on or off."""
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(rows, 4, 32, 32, generator=generator).cuda()
    prompt = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).cuda()
    cfg = TrainConfig(
        learning_rate=1e-3,
        train_batch_size=batch,
        mixed_precision=precision,
        seed=0,
        cuda_graph=cuda_graph_value(graph),
    )
    step = train_step(
        cfg,
        model=unet,
        params=lora_parameters(unet),
        schedule=ddpm.make_schedule(dict(SD15_SCHEDULER_CONFIG), torch.device("cuda")),
        latents_mean=mean,
        latents_std=torch.full_like(mean, 0.1),
        scaling_factor=0.18215,
        prompt_embeds=prompt.to(next(unet.parameters()).dtype),
    )
    return step, mean


def _rows(batch: int = 2) -> torch.Tensor:
    return torch.arange(batch, device="cuda").view(1, batch)  # (grad_accum_steps, batch_size)


def test_step_makes_no_host_sync_on_cuda(tiny_unet):
    step, _ = _step(_with_lora(tiny_unet, torch.float32), graph=False, precision="no")
    step(_rows())  # the first step creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call (.item(), D2H copy, nonzero...) raises
    try:
        step(_rows())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(step.metrics.loss_sum).item() and step.metrics.grad_norm_sum.item() > 0


def test_graph_replay_equals_the_eager_step_at_sd15_shapes(sd15_unet):
    unet = _with_lora(sd15_unet, torch.bfloat16)
    params = lora_parameters(unet)
    start = [p.detach().clone() for p in params]
    results = {}
    for graph in (False, True):
        with torch.no_grad():
            for param, value in zip(params, start):
                param.copy_(value)
        step, _ = _step(unet, graph=graph)
        if graph:
            step.capture_cuda_graph(_rows())
        step(_rows())
        torch.cuda.synchronize()
        gradient = torch.cat([p.grad.flatten() for p in params]).float()
        results[graph] = (step.metrics.loss_sum.item(), gradient, [p.detach().clone() for p in params])
    (eager_loss, eager_grad, eager_after), (graph_loss, graph_grad, graph_after) = results[False], results[True]
    assert eager_grad.norm() > 0 and any(not torch.equal(a, b) for a, b in zip(eager_after, start))
    assert graph_loss == pytest.approx(eager_loss, rel=1e-3)
    # Same kernels, same inputs; attention's backward may accumulate in another order: rounding-level only.
    relative = ((graph_grad - eager_grad).norm() / eager_grad.norm()).item()
    assert relative < 1e-2, f"gradients of the replay differ from the eager step's by {relative:.3g} (relative L2)"
    assert any(not torch.equal(a, b) for a, b in zip(graph_after, start))


def test_a_replay_reads_no_freed_memory_once_the_step_lets_go_of_its_inputs(tiny_unet):
    """A graph reads the latent cache and the prompt embedding it was captured with at every replay, whoever else
    still holds them; freed, their memory goes to the next allocations and the replay computes with what those
    write (NaN/inf in train()). Here the step lets go of them after the capture and the next allocations of their
    sizes hold NaN: the replay, which holds what the graph reads, still gives the eager step's loss."""
    unet = _with_lora(tiny_unet, torch.float32)
    params = lora_parameters(unet)
    start = [p.detach().clone() for p in params]
    losses = {}
    for graph in (False, True):
        with torch.no_grad():
            for param, value in zip(params, start):
                param.copy_(value)
        step, mean = _step(unet, graph=graph, precision="no")
        del mean  # the step's tensors are the only references left
        if graph:
            step.capture_cuda_graph(_rows())
            names = ("latents_mean", "latents_std", "prompt_embeds")
            layouts = [(getattr(step, name).shape, getattr(step, name).dtype) for name in names]
            for name in names:
                setattr(step, name, getattr(step, name).clone())
            # The caching allocator hands a freed block to the next allocation of its size on its stream.
            poison = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in layouts * 4]
        step(_rows())
        torch.cuda.synchronize()
        losses[graph] = (step.metrics.loss_sum.item(), step.metrics.nonfinite.item())
    del poison
    assert losses[True][1] == 0 and math.isfinite(losses[True][0]), f"the replay read freed memory: {losses[True]}"
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-3)


def _adamw_update(optimizer, param, before: torch.Tensor, lr: float) -> torch.Tensor:
    """AdamW's new weights from the moments it stored: decoupled decay, then the bias-corrected step."""
    group, state = optimizer.param_groups[0], optimizer.state[param]
    (beta1, beta2), eps, decay = group["betas"], group["eps"], group["weight_decay"]
    count = float(state["step"])
    denominator = state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**count) + eps
    return before * (1 - lr * decay) - lr / (1 - beta1**count) * state["exp_avg"] / denominator


def test_an_lr_set_between_replays_is_the_lr_the_replay_applies(tiny_unet):
    step, _ = _step(_with_lora(tiny_unet, torch.float32), graph=True, precision="no")
    step.capture_cuda_graph(_rows())
    step(_rows())  # at the built LR (1e-3): the moments exist from here on
    for lr in (5e-4, 0.0, 2e-3):
        set_lr(step.optimizer, lr)
        before = [p.detach().clone() for p in step.params]
        step(_rows())
        torch.cuda.synchronize()
        for param, old in zip(step.params, before):
            expected = _adamw_update(step.optimizer, param, old, lr)
            # atol: a few float32 ulps of weights near 1 (the fused kernel and the formula round differently:
            # 1.9e-8 seen on an H200); an update at a wrong LR differs by about that LR (>= 5e-4 here).
            torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)
        if lr == 0.0:
            assert all(torch.equal(p.detach(), old) for p, old in zip(step.params, before))


def test_a_nan_step_inside_a_graph_changes_nothing(tiny_unet):
    step, mean = _step(_with_lora(tiny_unet, torch.float32), graph=True, precision="no")
    step.capture_cuda_graph(_rows())
    step(_rows())
    torch.cuda.synchronize()

    def state() -> list[torch.Tensor]:
        tensors = [p.detach().clone() for p in step.params]
        for param in step.params:
            tensors += [step.optimizer.state[param][k].clone() for k in ("exp_avg", "exp_avg_sq", "step")]
        return tensors

    before, clean = state(), mean.clone()
    assert step.metrics.nonfinite.item() == 0
    mean.fill_(float("nan"))  # the graph reads this storage: the next replay's loss is NaN
    step(_rows())
    torch.cuda.synchronize()
    assert step.metrics.nonfinite.item() == 1
    after = state()
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "the NaN step changed weights or AdamW state"
    mean.copy_(clean)
    step(_rows())
    torch.cuda.synchronize()
    assert not torch.equal(step.params[-1].detach(), before[len(step.params) - 1])  # training goes on
    assert float(step.optimizer.state[step.params[0]]["step"]) == float(before[len(step.params) + 2]) + 1


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
def test_a_stopped_and_resumed_run_equals_the_straight_run(tiny_model_dir, phantom_dir, tmp_path, graph, deterministic):
    common = dict(device="cuda", mixed_precision="bf16", cuda_graph=cuda_graph_value(graph), max_train_steps=4)
    cache = tmp_path / "cache"
    training.train(make_cfg(tiny_model_dir, phantom_dir, tmp_path / "straight", cache, **common))
    training.train(make_cfg(tiny_model_dir, phantom_dir, tmp_path / "resumed", cache, **common), stop_after_steps=2)
    summary = training.train(
        make_cfg(tiny_model_dir, phantom_dir, tmp_path / "resumed", cache, resume_from_checkpoint="latest", **common)
    )
    assert summary["start_step"] == 2 and summary["steps"] == 4
    for at in (2, 4):
        a, b = (
            load_checkpoint(tmp_path / run / "checkpoints" / f"checkpoint-{at}").lora for run in ("straight", "resumed")
        )
        assert a.keys() == b.keys()
        different = [key for key in a if not torch.equal(a[key], b[key])]
        assert not different, f"step {at}: {len(different)} of {len(a)} LoRA tensors differ, e.g. {different[0]}"


def test_bf16_first_step_loss_is_within_1e_2_of_float32(sd15_unet):
    losses = {}
    for precision, dtype in (("no", torch.float32), ("bf16", torch.bfloat16)):
        step, _ = _step(_with_lora(sd15_unet, dtype), graph=False, precision=precision)
        step(_rows())
        losses[precision] = step.metrics.loss_sum.item()
        del step
        torch.cuda.empty_cache()
    assert math.isfinite(losses["no"]) and losses["no"] > 0
    assert losses["bf16"] == pytest.approx(losses["no"], rel=1e-2)
