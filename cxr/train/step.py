"""One training step: `TrainStep(cfg, model=, params=, ...)` holds it and the state it changes.

Training, the benchmark and the tests all build the step as `TrainStep(cfg, ...)`, so the step that is timed
and tested is the step that trains.

    TrainStep(cfg, model=, params=, schedule=, latents_mean=, ...)   the step, its optimizer, scaler,
        step(indices)                                                 generators and device metrics
        step.start_cuda_graph(example_indices)   --cuda_graph: from then on step(indices) may replay a graph
    diffusion_loss(model, x0, noise, t, prompt_embeds, schedule, snr_gamma, autocast_dtype)  forward + loss
    make_optimizer / load_optimizer_state       AdamW over the LoRA tensors, fused where possible
    optimizer_state_dict                        its state per layer, as checkpoints store it
    lr_at / scheduled_lr / set_lr               the LR schedule, set without a host sync
    StepMetrics(device)                         device accumulators for loss / grad norm / non-finite flag
    step_unless                                 an optimizer step that is skipped (no host read) on NaN/inf
    DataOrder                                   per-epoch permutations on the device, rank shards, position
    configure_cuda(device, tf32)                the CUDA device made current, TensorFloat-32 on or off

The step has static shapes and no host synchronisation (no `.item()`, no tensor-valued `if`), so on CUDA it
can be captured whole in a CUDA graph (`--cuda_graph`, cxr.train.step_graph); the loss and grad norm are
summed on the device and read every `--log_every` steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable

import torch
import torch.distributed

from cxr.config import TrainConfig
from cxr.data.latents import sample_latents
from cxr.model import ddpm
from cxr.model.lora import is_packed, layer_slots, lora_modules
from cxr.runtime import DistInfo, TrainingError, autocast_dtype
from cxr.train import step_graph

# ------------------------------------------------------------------------------------- optimizer and LR


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up over `warmup_steps`, then constant,
    linear decay to 0 or cosine decay to 0 at `total_steps`. The first warm-up step already has lr > 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return base_lr * (1.0 - progress)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"--lr_scheduler: unknown schedule {kind!r}")


def scheduled_lr(cfg: TrainConfig, step: int) -> float:
    """`lr_at` with the run's --learning_rate, --lr_warmup_steps, --max_train_steps and --lr_scheduler."""
    return lr_at(
        step,
        base_lr=cfg.learning_rate,
        warmup_steps=cfg.lr_warmup_steps,
        total_steps=cfg.max_train_steps,
        kind=cfg.lr_scheduler,
    )


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set the LR without a host sync: fill the device tensor in place (what a CUDA graph reads) or set the float."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def configure_cuda(device, tf32: bool) -> None:
    """On CUDA: make `device` the current device (streams, graphs and anything else created without an explicit
    device land on it: `--device cuda:1` captures on GPU 1), and TensorFloat-32 for float32 matmuls and cuDNN
    convolutions (`--tf32`: float32 in and out, inputs rounded to a 10-bit mantissa, several times the float32
    throughput; the run's float32 work is the latent cache's VAE encode, and the whole step with
    `--mixed_precision no`). Nothing on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    if device.index is not None:
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def stream_seed(seed: int, stream: str) -> int:
    """The seed of one of the run's random streams, derived from --seed, so that two streams never draw the
    same sequence (a CPU generator keeps 32 bits of its seed, so offsets like seed + 2**32 would collide)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}".encode()).digest()[:4], "little")


def make_optimizer(params, *, lr: float, weight_decay: float, device: torch.device, capturable: bool = False):
    """AdamW over `params`. Fused (one kernel, step counter and LR kept as device tensors: no host reads) on
    CUDA and CPU; foreach where fused is unavailable. With `capturable` the LR is a device tensor a graph reads."""
    params = list(params)
    try:
        lr_value = torch.tensor(lr, dtype=torch.float32, device=device) if device.type == "cuda" else lr
        return torch.optim.AdamW(params, lr=lr_value, weight_decay=weight_decay, fused=True, capturable=capturable)
    except (RuntimeError, ValueError):
        if capturable:
            raise
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def optimizer_state_dict(optimizer: torch.optim.Optimizer, model=None) -> dict:
    """`optimizer.state_dict()` with one entry per layer's A and B (`cxr.model.lora.layer_slots` order), as a
    checkpoint stores it whatever the tensors' layout: with `model`, the packed LoRA tensors' state (moments,
    step count) is cut into each layer's part. Copies: the optimizer's own tensors are left alone."""
    full = optimizer.state_dict()
    if model is None or not is_packed(model):
        return full
    slots = layer_slots(model)
    if len(full["param_groups"]) != 1:
        raise ValueError("per-layer optimizer state needs one parameter group over the LoRA tensors")
    index = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
    state = {}
    for number, (holder, view) in enumerate(slots):
        saved = full["state"].get(index[id(holder)])
        if saved:
            state[number] = {key: _part(value, holder, view) for key, value in saved.items()}
    group = {**full["param_groups"][0], "params": list(range(len(slots)))}
    return {"state": state, "param_groups": [group]}


def _part(value, holder: torch.Tensor, view) -> object:
    if torch.is_tensor(value):
        return view(value).clone() if value.shape == holder.shape else value.clone()
    return value


def _packed(optimizer: torch.optim.Optimizer, saved: dict, model) -> dict:
    """A per-layer state dict (`optimizer_state_dict`) as the state of `optimizer`'s (packed) tensors."""
    slots = layer_slots(model)
    params = optimizer.param_groups[0]["params"]
    if len(saved["state"]) and len(saved["param_groups"][0]["params"]) != len(slots):
        raise ValueError(
            f"the checkpoint's optimizer state has {len(saved['param_groups'][0]['params'])} LoRA tensors, "
            f"this model {len(slots)} (another --lora_targets?)"
        )
    index = {id(p): i for i, p in enumerate(params)}
    state: dict[int, dict] = {}
    for number, (holder, view) in enumerate(slots):
        layer = saved["state"].get(number)
        if not layer:
            continue
        target = state.setdefault(index[id(holder)], {})
        for key, value in layer.items():
            if torch.is_tensor(value) and value.shape != holder.shape and value.ndim == 2:
                whole = target.setdefault(key, torch.zeros_like(holder, dtype=value.dtype, device=value.device))
                view(whole).copy_(value)
            else:
                target.setdefault(key, value)
    group = {**saved["param_groups"][0], "params": list(range(len(params)))}
    return {"state": state, "param_groups": [group]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, model=None) -> None:
    """Load a checkpoint's optimizer state but keep this optimizer's settings.

    With `model`, the checkpoint's state is per layer (`optimizer_state_dict`) and goes into the packed tensors.

    The checkpoint gives the state (moments, step counts); the freshly built param groups give everything
    else: the flags of this run (LR, weight decay) and its mode (`fused`, `capturable`, `foreach`). Taking
    the mode from the checkpoint would make an eager run's checkpoint fail inside a --cuda_graph capture
    ("capturable is False"), and the reverse run slower. The settings go in before loading, so the step
    counters are placed where this mode needs them (on the device when fused or capturable). The LR object
    itself (a device tensor a CUDA graph reads) is put back after loading, which copies it.
    """
    if model is not None and is_packed(model):
        saved = _packed(optimizer, saved, model)
    fresh = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    groups = [{**old, **new} for old, new in zip(saved["param_groups"], fresh)]
    optimizer.load_state_dict({**saved, "param_groups": groups})
    for group, settings in zip(optimizer.param_groups, fresh):
        group["lr"] = settings["lr"]


# ------------------------------------------------------------------------------------------- data order


class DataOrder:
    """Which cache rows each step uses: a fresh permutation per epoch, computed on the device from
    (seed, epoch) so that it can be recomputed on resume; the last partial global batch is dropped.

    A step takes `grad_accum_steps` micro-batches of the global batch (`batch_size * world_size` rows);
    rank r uses columns [r * batch_size, (r + 1) * batch_size) of each, so 2 ranks at batch B see exactly
    the rows one process at batch 2B sees. The position is (epoch, rows consumed in that epoch).
    """

    def __init__(self, num_rows: int, *, batch_size: int, grad_accum_steps: int, dist: DistInfo, seed: int, device):
        self.num_rows, self.batch_size, self.accum, self.dist = num_rows, batch_size, grad_accum_steps, dist
        self.global_batch = batch_size * dist.world_size
        self.rows_per_step = self.global_batch * grad_accum_steps
        if num_rows < self.rows_per_step:
            raise TrainingError(
                f"--train_batch_size: one step needs {self.rows_per_step} images "
                f"(batch {batch_size} x {grad_accum_steps} accumulation x {dist.world_size} processes) but the "
                f"training split has {num_rows}; lower --train_batch_size/--grad_accum_steps or add images"
            )
        self.steps_per_epoch = num_rows // self.rows_per_step
        self.seed, self.device = seed, device
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=generator, device=self.device)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None

    def peek_indices(self) -> torch.Tensor:
        """The next step's indices, leaving the position where it is (the example a CUDA graph is captured with)."""
        position = self.state()
        indices = self.next_indices()
        self.load_state(position)
        return indices

    def next_indices(self) -> torch.Tensor:
        """(grad_accum_steps, batch_size) cache rows of this rank for the next step, on the device."""
        if self.position + self.rows_per_step > self.num_rows:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        if self._perm is None:
            self._perm = self._permutation(self.epoch)
        rows = self._perm[self.position : self.position + self.rows_per_step].view(self.accum, self.global_batch)
        self.position += self.rows_per_step
        start = self.dist.rank * self.batch_size
        return rows[:, start : start + self.batch_size]


# ------------------------------------------------------------------------------------------------ step


class StepMetrics:
    """Device-side sums over the steps since the last read; `read()` is the only host sync of the loop.

    `nonfinite` counts steps whose loss or gradient norm was NaN/inf; `finite_steps` counts the steps before
    the first such step, so a read tells which step of its window went bad first (and hence which weights
    still gave a finite loss)."""

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), device=device)
        self.steps = 0  # host counter: the host knows how many steps it launched

    def reset(self) -> None:
        for tensor in (self.loss_sum, self.grad_norm_sum, self.nonfinite, self.finite_steps):
            tensor.zero_()
        self.steps = 0

    def add_nonfinite(self, flag: torch.Tensor) -> None:
        """Record one step's non-finite flag (0-dim, > 0 when bad) on the device."""
        self.nonfinite.add_((flag > 0).float())
        self.finite_steps.add_((self.nonfinite == 0).float())

    def read(self, dist: DistInfo | None = None, extra_flag: bool = False) -> dict:
        """Mean loss / grad norm since the last read, whether any was non-finite, and `extra_flag` OR-ed over
        ranks (used to agree on a stop request); averaged over ranks under DDP. Syncs with the device."""
        packed = torch.stack(
            [
                self.loss_sum,
                self.grad_norm_sum,
                self.nonfinite,
                torch.tensor(float(extra_flag), device=self.loss_sum.device),
            ]
        )
        finite_steps = self.finite_steps.clone()
        world = 1
        if dist is not None and dist.enabled:
            torch.distributed.all_reduce(packed)
            world = dist.world_size
        loss_sum, grad_sum, nonfinite, flag = packed.tolist()  # the sync: once per --log_every steps
        if nonfinite > 0 and world > 1:  # every rank takes this branch: the first bad step on any rank
            torch.distributed.all_reduce(finite_steps, op=torch.distributed.ReduceOp.MIN)
        window = self.steps
        steps = max(1, self.steps)
        self.reset()
        return {
            "loss": loss_sum / world / steps,
            "grad_norm": grad_sum / world / steps,
            "nonfinite": nonfinite > 0,
            "finite_steps": int(finite_steps.item()) if nonfinite > 0 else window,  # steps before the first bad one
            "flag": flag > 0,
        }


def diffusion_loss(model, x0, noise, timesteps, prompt_embeds, schedule, snr_gamma: float, autocast_dtype):
    """Per-step training loss: noise x0 at `timesteps`, predict with `model` under autocast, MSE against the
    target per sample in float32, Min-SNR-gamma weighted (gamma 0: plain MSE), mean over the batch."""
    noisy = ddpm.add_noise(x0, noise, timesteps, schedule)
    embeds = prompt_embeds.expand(x0.shape[0], -1, -1)
    # No autocast weight cache: each weight is used once per forward, and a cache breaks CUDA-graph capture.
    with torch.autocast(
        x0.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None, cache_enabled=False
    ):
        prediction = model(noisy, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
    target = ddpm.training_target(x0, noise, timesteps, schedule)
    per_sample = (prediction.float() - target).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    if snr_gamma > 0:
        per_sample = per_sample * ddpm.min_snr_weights(schedule.snr[timesteps], snr_gamma, schedule.prediction_type)
    return per_sample.mean()


def step_unless(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], skip: torch.Tensor) -> None:
    """`optimizer.step()`, without any effect when `skip` (0-dim float32 on the device, 1.0 or 0.0) is 1.

    No host read on the fused path. A fused optimizer (what make_optimizer builds on CUDA and CPU) takes `skip`
    as its `found_inf`, the GradScaler protocol: the kernel leaves weights and moments alone and the step count
    is put back. Any other optimizer is stepped, then its weights and tensor state are put back with
    torch.where (state created by this step goes back to zeros: a fresh AdamW state).
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = skip
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return
    with torch.no_grad():
        before = {
            p: (p.detach().clone(), {k: v.clone() for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)})
            for p in params
        }
        optimizer.step()
        for param, (weights, state) in before.items():
            param.copy_(torch.where(skip.to(param.device) > 0, weights, param))
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value):
                    old = state.get(key, torch.zeros_like(value))
                    value.copy_(torch.where(skip.to(value.device) > 0, old, value))


# ------------------------------------------------------------------------------------------ the step


class TrainStep:
    """One optimizer step over `indices` (grad_accum_steps, batch_size) of cache rows, from the run's flags,
    and the state it changes: AdamW at the schedule's first LR (capturable where a CUDA graph may replay the
    step), a GradScaler for fp16, the random streams, the device metrics.

    Everything runs on the device: latent sampling (mean + std * noise), diffusion noise (+ offset) and
    uniform timesteps drawn from the noise generator (seeded with --seed) for the whole global batch (every
    rank draws all `batch_size * world_size` rows and keeps its own slice, so N ranks at batch B equal one
    process at batch N*B), forward + weighted loss, backward, gradient clipping, AdamW. LoRA dropout draws its
    masks from a generator of its own (seeded from --seed too, but another stream), so that the noise does not
    depend on whether dropout is on. Loss and grad norm are added to `metrics` on the device. An update whose
    gradient norm is NaN/inf is never applied (`step_unless`: LoRA weights and AdamW state stay as they were);
    such a step, or a NaN/inf loss, is flagged in `metrics`. With a GradScaler (fp16) the scaler skips inf
    steps itself (its loss-scale search) and only the loss is flagged. No host sync: a fused AdamW (what
    make_optimizer builds on CUDA and CPU) takes the skip flag, and the GradScaler's `found_inf`, as device
    tensors; only the foreach fallback makes a GradScaler read it.

    `model` may be the UNet, its DDP wrapper (`no_sync`: its no_sync, which skips the all-reduce on all but
    the last micro-batch) or a compiled module; `optimizer` shares an existing one (the benchmark's variants
    of one step). After `start_cuda_graph(example_indices)` (--cuda_graph auto/on) the same call may replay
    the step from a CUDA graph; `capture_cuda_graph` captures without the check (the benchmark).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model,
        params: list[torch.nn.Parameter],
        schedule,
        latents_mean: torch.Tensor,
        latents_std: torch.Tensor,
        scaling_factor: float,
        prompt_embeds: torch.Tensor,
        dist: DistInfo = DistInfo(),
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        self.cfg, self.model, self.params, self.schedule = cfg, model, list(params), schedule
        self.latents_mean, self.latents_std, self.scaling_factor = latents_mean, latents_std, scaling_factor
        self.device = device = latents_mean.device
        self.dist, self.no_sync = dist, no_sync
        configure_cuda(device, cfg.tf32)
        step_graph.check_cuda_graph_flag(cfg, device, dist)
        self.graph_wanted = cfg.cuda_graph != "off" and not step_graph.graph_blockers(cfg, device, dist)
        self.prompt_embeds = prompt_embeds.to(device)
        self.global_batch = cfg.train_batch_size * dist.world_size
        self.own = slice(dist.rank * cfg.train_batch_size, (dist.rank + 1) * cfg.train_batch_size)
        self.autocast_dtype = autocast_dtype(cfg.mixed_precision)
        self.optimizer = optimizer or make_optimizer(
            self.params,
            lr=scheduled_lr(cfg, 0),
            weight_decay=cfg.adam_weight_decay,
            device=device,
            capturable=self.graph_wanted,
        )
        self.scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.generators = {"noise": self.generator}  # what a checkpoint saves and a CUDA graph advances
        if cfg.lora_dropout > 0:
            dropout = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, "lora_dropout"))
            self.generators["lora_dropout"] = dropout
            for module in lora_modules(model).values():
                module.dropout_generator = dropout
        self.metrics = StepMetrics(device)
        self._replay: Callable[[torch.Tensor], None] | None = None

    def __call__(self, indices: torch.Tensor) -> None:
        (self._replay or self.run_eager)(indices)

    @property
    def replays_graph(self) -> bool:
        return self._replay is not None

    def start_cuda_graph(self, example_indices: torch.Tensor) -> None:
        """--cuda_graph auto/on: capture the step, check it against the eager step, and replay it from then on
        if they agree (cxr.train.step_graph); otherwise stay eager with a warning (auto) or raise (on)."""
        step_graph.start_cuda_graph(self, example_indices)

    def capture_cuda_graph(self, example_indices: torch.Tensor) -> None:
        """Capture the step and replay it from now on, without the check against the eager step."""
        self.use_replay(step_graph.capture_cuda_graph(self, example_indices))

    def use_replay(self, replay: Callable[[torch.Tensor], None]) -> None:
        self._replay = replay

    def _draw(self, *shape) -> torch.Tensor:
        return torch.randn((self.global_batch, *shape), generator=self.generator, device=self.device)[self.own]

    def run_eager(self, indices: torch.Tensor) -> None:
        """The step itself (what a CUDA graph captures): no host reads, no branch on a tensor's value."""
        cfg, metrics = self.cfg, self.metrics
        accum, shape = cfg.grad_accum_steps, tuple(self.latents_mean.shape[1:])
        self.optimizer.zero_grad(set_to_none=True)
        bad_loss = torch.zeros((), device=self.device)
        for micro in range(accum):
            rows = indices[micro]
            x0 = sample_latents(
                self.latents_mean[rows], self.latents_std[rows], self._draw(*shape), self.scaling_factor
            )
            noise = self._draw(*shape)
            if cfg.noise_offset > 0:
                noise = ddpm.offset_noise(noise, self._draw(shape[0], 1, 1), cfg.noise_offset)
            timesteps = ddpm.sample_timesteps(self.global_batch, self.schedule, self.generator, self.device)[self.own]
            sync = self.no_sync is not None and micro < accum - 1
            with self.no_sync() if sync else contextlib.nullcontext():
                loss = diffusion_loss(
                    self.model,
                    x0,
                    noise,
                    timesteps,
                    self.prompt_embeds,
                    self.schedule,
                    cfg.snr_gamma,
                    self.autocast_dtype,
                )
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            metrics.loss_sum.add_(scaled.detach())
            bad_loss = bad_loss + (~torch.isfinite(loss.detach())).float()
        self._update(bad_loss)

    def _update(self, bad_loss: torch.Tensor) -> None:
        """Clip, add the gradient norm to the metrics, and step AdamW unless the step went non-finite."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # Every tensor's norm in one launch (`_foreach_norm`), then the clipping in one (`_foreach_mul_`): the
        # arithmetic of clip_grad_norm_.
        norms = torch._foreach_norm([p.grad for p in self.params])
        grad_norm = torch.linalg.vector_norm(torch.stack(norms))
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.max_grad_norm, grad_norm, foreach=True)
        self.metrics.grad_norm_sum.add_(grad_norm.detach())
        if self.scaler is not None:
            self.metrics.add_nonfinite(bad_loss)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            # Decided on the (all-reduced) gradient norm alone, so that every DDP rank skips the same steps.
            skip = (~torch.isfinite(grad_norm.detach())).float()
            self.metrics.add_nonfinite(bad_loss + skip)
            step_unless(self.optimizer, self.params, skip)
