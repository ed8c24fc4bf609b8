"""The training step replayed from a CUDA graph (`--cuda_graph auto|on|off`), and the check that decides it.

    graph_blockers(cfg, device, dist) -> [reasons]     what keeps this run's step out of a CUDA graph
    check_cuda_graph_flag(cfg, device, dist)          `--cuda_graph on` where it cannot: an error before any model loads
    start_cuda_graph(step, example_indices)           two eager steps, the capture, two replayed steps, compared
    capture_cuda_graph(step, example_indices) -> GraphReplay: replay(indices), owning what the graph reads
    GraphInputs()                                     records the tensors a call reads that existed before it
    snapshot_train_state / restore_train_state        what a step changes, copied and put back in place

A graph replays the whole step (forward, backward, clipping, AdamW) with one launch instead of thousands, so
the CPU no longer bounds the step. `auto` (the default) replays it on CUDA when nothing blocks it and the check
passes; a capture error or a mismatch leaves the run eager with one warning that says why. `on` makes either an
error; `off` never captures.

The check runs at the start, on the run's own state: two eager steps from a snapshot, the snapshot put back,
the capture (whose warm-up steps are put back too), two replayed steps over the same rows, the snapshot put
back. The second step reads other rows than the capture did, so a replay that ignores its input shows. Replay
and eager run the same kernels, so they agree up to the order of floating-point sums in kernels that use
atomics (attention's backward): losses and gradient norms within 1%, weights within 1% of the eager update. A
stale input, a random stream that does not advance, an update that is not replayed: each moves them further.
The check sees the first replays only: a graph that goes wrong later in a run (after a checkpoint, say) is not
caught by it.

A graph replays its kernels on the memory its capture used. Whatever the step read from outside (the latent
cache, the prompt embedding, the weights, AdamW's state) must therefore stay allocated, and in place, as long as
the graph can be replayed: `GraphReplay` holds every such tensor, and the run never puts a new tensor where the
step reads one (restores copy into the tensors; tests/test_step_graph.py follows train() through validation,
checkpoints and a resume to check both).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cxr.runtime import DistInfo, TrainingError

if TYPE_CHECKING:
    from cxr.config import TrainConfig
    from cxr.train.step import TrainStep

RTOL = 1e-2  # loss and grad norm, relative; weights, relative to the largest eager update
CHECK_STEPS = 2


def graph_blockers(cfg: TrainConfig, device: torch.device, dist: DistInfo) -> list[str]:
    """Why this run's step cannot be replayed from a CUDA graph; empty when it can."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"CUDA graphs need a CUDA device and this run is on {device}")
    if cfg.mixed_precision == "fp16":
        # The fused AdamW reads the GradScaler's found_inf on the device, so nothing is read on the host; what
        # is missing is the scaler's loss scale and growth tracker in the state the capture's warm-up puts back.
        reasons.append(
            "fp16 training is not captured: the capture's warm-up steps would change the GradScaler's loss "
            "scale, which they do not put back (use --mixed_precision bf16)"
        )
    if dist.enabled:
        reasons.append("several processes (DDP) are not captured: DDP's gradient all-reduce is not graph-safe here")
    if cfg.gradient_checkpointing:
        # Checkpointing stashes and restores the CUDA RNG state inside the captured region, which capture does not
        # support in the torch versions we run (pytorch/pytorch#162504).
        reasons.append("--gradient_checkpointing is not graph-safe in this PyTorch (it saves the RNG state mid-step)")
    return reasons


def check_cuda_graph_flag(cfg: TrainConfig, device: torch.device, dist: DistInfo) -> None:
    """`--cuda_graph on` for a run whose step cannot be captured: a TrainingError naming what blocks it."""
    reasons = graph_blockers(cfg, device, dist) if cfg.cuda_graph == "on" else []
    if reasons:
        raise TrainingError(
            f"--cuda_graph on: {'; '.join(reasons)}; use --cuda_graph auto (eager where a graph cannot be used) or off"
        )


def start_cuda_graph(step: TrainStep, example_indices: torch.Tensor) -> None:
    """Decide, once at the start, whether `step(indices)` replays a CUDA graph (see the module docstring).

    The eager steps run first and their memory is returned before the capture, so the check needs no more
    memory than the larger of the two. An error in them (out of memory, say) is the eager step's own and is
    raised; an error while capturing or replaying is the graph's, and falls back to eager."""
    cfg = step.cfg
    if not step.graph_wanted:
        if cfg.cuda_graph == "auto" and step.device.type == "cuda":
            _fall_back("; ".join(graph_blockers(cfg, step.device, step.dist)))
        return
    rows = step.latents_mean.shape[0]
    batches = [example_indices, (example_indices + 1) % rows][:CHECK_STEPS]  # the replay must read new indices
    snapshot = snapshot_train_state(step)
    eager = _probe(step, step.run_eager, batches)
    restore_train_state(step, snapshot)
    replay, problem = None, None
    try:
        replay = capture_cuda_graph(step, example_indices)
    except Exception as error:  # any capture error: the eager step is still there
        problem = f"capturing it failed: {type(error).__name__}: {error}"
    if replay is not None:
        try:
            problem = compare(_probe(step, replay, batches), eager, snapshot["params"])
        except Exception as error:
            problem = f"replaying it failed: {type(error).__name__}: {error}"
        restore_train_state(step, snapshot)
    if problem is None:
        step.use_replay(replay)
        return
    del replay
    if step.device.type == "cuda":
        torch.cuda.empty_cache()  # the graph's memory pool
    if cfg.cuda_graph == "on":
        raise TrainingError(f"--cuda_graph on: {problem}; use --cuda_graph auto (eager on a failed check) or off")
    _fall_back(problem)


def _fall_back(reason: str) -> None:
    warnings.warn(f"--cuda_graph auto: the training step runs eagerly, not from a CUDA graph: {reason}", stacklevel=3)


def compare(graphed: dict, eager: dict, start: list[torch.Tensor]) -> str | None:
    """None when the replayed steps (`graphed`) agree with the eager ones from the same weights `start`, else
    what differs (a host read: once, at the start)."""
    for name in ("loss", "grad_norm", "nonfinite"):
        for index, (ours, reference) in enumerate(zip(graphed[name], eager[name])):
            if not torch.isclose(ours, reference, rtol=RTOL, atol=1e-6, equal_nan=True):
                return f"step {index + 1} of the check: {name} {ours.item():.6g} replayed, {reference.item():.6g} eager"
    update = max(float((after - before).abs().max()) for after, before in zip(eager["params"], start))
    differs = max(float((ours - theirs).abs().max()) for ours, theirs in zip(graphed["params"], eager["params"]))
    if not differs <= RTOL * update + 1e-7:  # `not <=`: NaN fails too
        return (
            f"after {len(graphed['loss'])} steps the replayed LoRA weights differ from the eager ones by up to "
            f"{differs:.3g} (the eager update is up to {update:.3g})"
        )
    return None


def _probe(step: TrainStep, call: Callable[[torch.Tensor], None], batches: list[torch.Tensor]) -> dict:
    record = {"loss": [], "grad_norm": [], "nonfinite": []}
    for indices in batches:
        step.metrics.reset()
        call(indices)
        record["loss"].append(step.metrics.loss_sum.clone())
        record["grad_norm"].append(step.metrics.grad_norm_sum.clone())
        record["nonfinite"].append(step.metrics.nonfinite.clone())
    record["params"] = [p.detach().clone() for p in step.params]
    return record


def capture_cuda_graph(step: TrainStep, example_indices: torch.Tensor, warmup_steps: int = 3) -> GraphReplay:
    """Capture `step.run_eager` in a CUDA graph; returns `replay(indices)` with the same effect.

    Warm-up runs on a side stream (as torch.cuda.graph requires); what the step changes is put back afterwards,
    so the warm-up leaves no trace in the run. The last warm-up step reads what the captured one does (AdamW's
    state exists from the first on), so it is the one that names the graph's inputs. The step's generators are
    registered with the graph, so every replay draws fresh noise (and dropout masks) and advances them as an
    eager step would.
    """
    if warmup_steps < 1:
        raise ValueError(f"capture_cuda_graph: warmup_steps must be >= 1, got {warmup_steps}")
    static_indices = example_indices.clone()
    snapshot = snapshot_train_state(step)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps - 1):
            step.run_eager(static_indices)
        with GraphInputs() as inputs:
            step.run_eager(static_indices)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for generator in step.generators.values():
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        step.run_eager(static_indices)
    restore_train_state(step, snapshot)
    return GraphReplay(graph, static_indices, inputs.tensors)


class GraphReplay:
    """A captured step: `replay(indices)` copies `indices` into the graph's static input and replays the graph.

    A graph reads and writes the memory its capture used, at every replay, whoever else still holds it. So the
    replay owns, besides the graph, every tensor the step read that existed before it: the latent cache, the
    prompt embedding, the schedule tables, the weights, AdamW's state and LR, the metrics. Freed while the graph
    still reads it, such memory is handed to the next allocation, and the replay computes with whatever that
    writes there (NaN where deterministic algorithms fill new memory with NaN)."""

    def __init__(self, graph, static_indices: torch.Tensor, inputs: list[torch.Tensor]):
        self.graph, self.static_indices, self.inputs = graph, static_indices, inputs

    def __call__(self, indices: torch.Tensor) -> None:
        self.static_indices.copy_(indices)
        self.graph.replay()


class GraphInputs(TorchDispatchMode):
    """Records, while active, the tensors the ops read or write that existed before it began (one per storage):
    the memory a graph captured from the same ops reads at every replay. Recording is host work only."""

    def __init__(self):
        super().__init__()
        self.tensors: list[torch.Tensor] = []
        self._seen: set[int] = set()  # storage addresses: the inputs found, and everything made while recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes():
                address = value.untyped_storage().data_ptr()
                if address not in self._seen:
                    self._seen.add(address)
                    self.tensors.append(value)
        out = func(*args, **kwargs)
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._seen.add(value.untyped_storage().data_ptr())
        return out


# ------------------------------------------------------------------------------------------ the state


def snapshot_train_state(step: TrainStep) -> dict:
    """Copies of what a training step changes: LoRA weights, optimizer state, the step's generators."""
    optimizer = step.optimizer
    return {
        "params": [p.detach().clone() for p in step.params],
        "optimizer": {
            p: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
            for p in step.params
            if p in optimizer.state
        },
        "generators": {name: gen.get_state() for name, gen in step.generators.items()},
    }


@torch.no_grad()
def restore_train_state(step: TrainStep, snapshot: dict) -> None:
    """Put back a snapshot in place (tensor storage is kept: a captured graph keeps pointing at it); optimizer
    state created since the snapshot is zeroed, which is what a fresh AdamW state is; metrics are reset."""
    for param, saved in zip(step.params, snapshot["params"]):
        param.copy_(saved)
    for param in step.params:
        for key, value in step.optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                saved = snapshot["optimizer"].get(param, {}).get(key)
                if saved is None:
                    value.zero_()
                else:
                    value.copy_(saved)
    step.metrics.reset()
    for name, generator in step.generators.items():
        generator.set_state(snapshot["generators"][name])
