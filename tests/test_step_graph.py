"""The CUDA-graph path of train(), modelled on the CPU: a captured step reads and writes the same memory at every
replay, so nothing it read at capture may be freed or replaced while the run replays it.

`GraphModel` stands in for `torch.cuda.graph` (which needs CUDA): at capture it records, through a dispatch
mode, every tensor storage and generator the step touched that existed before the step began (the graph's
inputs: LoRA weights, AdamW state, the latent cache, the prompt embedding, the schedule tables, the base
weights, the metrics, the static indices). Each replay first checks that every one of them is still alive (a
freed one is memory the graph reads after the run let go of it), then runs the step eagerly under the same
recorder and checks that it touches exactly those storages and generators (one replaced since the capture is
memory the graph no longer shares with the run).
"""

import contextlib
import copy
import weakref

import pytest
import torch
from helpers import train_cfg
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cxr.train import step_graph, training

pytestmark = pytest.mark.usefixtures("one_thread")


class _Recorder(TorchDispatchMode):
    """The storages (by address) and generators that one call reads or writes and did not create itself."""

    def __init__(self):
        super().__init__()
        self.created: set[int] = set()
        self.inputs: dict[int, tuple[StorageWeakRef, str]] = {}
        self.generators: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, torch.Generator):
                self.generators.add(value._cdata)  # the C++ generator: Python wraps it anew per call
            elif isinstance(value, torch.Tensor) and value.untyped_storage().nbytes():
                address = value.untyped_storage().data_ptr()
                if address not in self.created and address not in self.inputs:
                    label = f"{tuple(value.shape)} {value.dtype} read by {func}"
                    self.inputs[address] = (StorageWeakRef(value.untyped_storage()), label)
        out = func(*args, **kwargs)
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.created.add(value.untyped_storage().data_ptr())
        return out


class GraphModel:
    """`capture_cuda_graph(step, example_indices)` for the CPU: returns `replay(indices)`, which checks the graph's
    invariant before it runs the step (see the module docstring)."""

    def __init__(self):
        self.replays = 0

    def __call__(self, step, example_indices):
        static_indices = example_indices.clone()
        snapshot = step_graph.snapshot_train_state(step)
        with _Recorder() as captured:
            step.run_eager(static_indices)
        step_graph.restore_train_state(step, snapshot)
        # A graph holds its kernels, not the step: the model must not keep the step's tensors alive either.
        run_eager = weakref.WeakMethod(step.run_eager)

        def replay(indices):
            freed = [label for ref, label in captured.inputs.values() if ref.expired()]
            assert not freed, f"the graph reads {len(freed)} freed tensor(s), e.g. {freed[0]}"
            static_indices.copy_(indices)
            with _Recorder() as now:
                run_eager()(static_indices)
            moved = sorted(label for address, (_, label) in now.inputs.items() if address not in captured.inputs)
            assert not moved, f"the step reads {len(moved)} tensor(s) the graph does not, e.g. {moved[0]}"
            assert now.generators == captured.generators, "the step draws from a generator the graph does not"
            self.replays += 1

        return replay


@pytest.fixture
def graph_model(monkeypatch):
    """train() on the CPU as on CUDA with --cuda_graph on: nothing blocks the graph, and its capture is GraphModel."""
    model = GraphModel()
    monkeypatch.setattr(step_graph, "graph_blockers", lambda cfg, device, dist: [])
    monkeypatch.setattr(step_graph, "capture_cuda_graph", model)
    return model


def test_graph_model_sees_a_freed_and_a_replaced_input(tiny_model_dir, graph_model):
    """The model itself: a latent cache the step no longer holds (freed), and AdamW state replaced by new tensors,
    each fail the next replay; the untouched step replays."""
    from helpers import tiny_step

    _, _, step, _, _ = tiny_step(tiny_model_dir)
    indices = torch.tensor([[0, 1], [2, 3]])
    step.run_eager(indices)  # AdamW's state exists before the capture, as after the start check
    replay = graph_model(step, indices)
    replay(indices)
    assert graph_model.replays == 1
    step.latents_std = step.latents_std.clone()  # the captured tensor's last reference goes
    with pytest.raises(AssertionError, match="freed tensor"):
        replay(indices)

    _, _, step, _, _ = tiny_step(tiny_model_dir)
    step.run_eager(indices)
    replay = graph_model(step, indices)
    # The captured tensors are held here, so that what fails is their replacement, not their release.
    captured_state = [dict(state) for state in step.optimizer.state.values()]
    step.optimizer.load_state_dict(copy.deepcopy(step.optimizer.state_dict()))  # as a resume loads new tensors
    with pytest.raises(AssertionError, match="tensor\\(s\\) the graph does not"):
        replay(indices)
    del captured_state


def test_a_replayed_run_keeps_every_graph_input_through_validation_checkpoints_and_resume(
    tiny_model_dir, phantom_dir, tmp_path, graph_model
):
    """train() with the graph path (--cuda_graph on; the capture is GraphModel): validation with the sample grid,
    checkpoints and the adapter export between replays, a stop and a resume that captures again. Every replay
    finds the graph's inputs alive and in place."""
    common = dict(
        cuda_graph="on",
        max_train_steps=4,
        validation_steps=2,
        num_validation_images=1,
        validation_inference_steps=1,
    )
    out, cache = tmp_path / "run", tmp_path / "cache"
    training.train(train_cfg(tiny_model_dir, phantom_dir, out, cache, **common), stop_after_steps=2)
    # the start check replays twice, then steps 1-2
    assert graph_model.replays == 4
    summary = training.train(
        train_cfg(tiny_model_dir, phantom_dir, out, cache, resume_from_checkpoint="latest", **common)
    )
    assert summary["start_step"] == 2 and summary["steps"] == 4
    assert graph_model.replays == 8


class _Stream:
    def wait_stream(self, other):
        pass


class _Graph:
    """torch.cuda.CUDAGraph for the CPU: counts replays (the captured kernels are what CUDA would run)."""

    def __init__(self):
        self.replays = 0

    def register_generator_state(self, generator):
        pass

    def replay(self):
        self.replays += 1


def test_the_replay_owns_every_tensor_the_captured_step_reads(tiny_model_dir, monkeypatch):
    """capture_cuda_graph (torch.cuda's stream and graph calls replaced by CPU stand-ins, the step's own code
    unchanged): once the step lets go of its latent cache and prompt embedding and AdamW's state is loaded anew,
    the old tensors, which the graph would go on reading, are still allocated: the replay holds them. Without it,
    their memory returns to the allocator and the next allocation writes there (NaN/inf in train())."""
    from helpers import tiny_step

    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    _, _, step, _, _ = tiny_step(tiny_model_dir)
    indices = torch.tensor([[0, 1], [2, 3]])
    step.capture_cuda_graph(indices)
    held = {
        name: StorageWeakRef(getattr(step, name).untyped_storage())
        for name in ("latents_mean", "latents_std", "prompt_embeds")
    }
    held.update(
        (f"AdamW {key} of parameter {index}", StorageWeakRef(value.untyped_storage()))
        for index, param in enumerate(step.params)
        for key, value in step.optimizer.state[param].items()
    )
    for name in ("latents_mean", "latents_std", "prompt_embeds"):
        setattr(step, name, getattr(step, name).clone())
    step.optimizer.load_state_dict(copy.deepcopy(step.optimizer.state_dict()))
    freed = [name for name, ref in held.items() if ref.expired()]
    assert not freed, f"freed while the graph still reads them: {freed}"
    step(indices)
    assert step._replay.graph.replays == 1
