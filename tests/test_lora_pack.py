"""The packed LoRA tensors (cxr.model.lora_pack): few trainable tensors, per-layer views, per-layer optimizer state
in checkpoints (the format of one tensor per layer), and the same training as one tensor per layer."""

import copy

import torch
from helpers import tiny_step

import cxr.train.step
from cxr.model import lora


def test_an_injected_unet_trains_a_few_packed_tensors_that_every_layer_reads(tiny_model_dir):
    unet, _, step, _, (params, _, _) = tiny_step(tiny_model_dir)
    modules = lora.lora_modules(unet)
    # one tensor per input width (the A's) and one per rank (the B's), instead of an A and a B per layer
    widths = {m.in_features for m in modules.values()}
    assert len(params) == len(widths) + 1 < 2 * len(modules)
    step(torch.tensor([[0, 1], [2, 3]]))
    for path, module in modules.items():
        grad_a, grad_b = module.lora_grads()
        assert grad_a.shape == module.lora_A.shape and grad_b.shape == module.lora_B.shape, path
    with torch.no_grad():  # a layer's tensors are views: writing one changes what the model computes with
        module.lora_B.fill_(0.5)
    holder, view = lora.layer_slots(unet)[-1]
    assert torch.equal(view(holder.detach()), torch.full_like(module.lora_B, 0.5))
    # a copy (after a forward with gradients) has its own pack, which its layers read
    clone = copy.deepcopy(unet)
    copied = lora.lora_modules(clone)[path]
    assert copied.pack is clone.lora_pack is not unet.lora_pack
    with torch.no_grad():
        copied.lora_B.fill_(0.25)
    assert torch.equal(module.lora_B, torch.full_like(module.lora_B, 0.5))


def test_packed_training_equals_training_one_tensor_per_layer(tiny_model_dir):
    """Two steps of the packed step against AdamW over each layer's own A and B, fed the same gradients: the same
    weights (the packed step's gradients are checked against peft in test_lora)."""
    unet, _, step, _, (params, optimizer, _) = tiny_step(tiny_model_dir)
    modules = list(lora.lora_modules(unet).values())
    own = [t.detach().clone().requires_grad_(True) for m in modules for t in (m.lora_A, m.lora_B)]
    settings = optimizer.param_groups[0]
    reference = cxr.train.step.make_optimizer(
        own, lr=settings["lr"], weight_decay=settings["weight_decay"], device=torch.device("cpu")
    )
    for indices in (torch.tensor([[0, 1], [2, 3]]), torch.tensor([[4, 5], [6, 7]])):
        step(indices)
        for tensor, grad in zip(own, [g for m in modules for g in m.lora_grads()]):
            tensor.grad = grad.clone()
        reference.step()
    for tensor, (holder, view) in zip(own, lora.layer_slots(unet)):
        torch.testing.assert_close(view(holder.detach()), tensor.detach(), rtol=0, atol=1e-7)
    saved = cxr.train.step.optimizer_state_dict(optimizer, unet)
    expected = reference.state_dict()
    assert saved["param_groups"][0]["params"] == expected["param_groups"][0]["params"]
    for number, state in expected["state"].items():
        assert saved["state"][number].keys() == state.keys()
        for key, value in state.items():
            assert saved["state"][number][key].shape == value.shape, (number, key)
            torch.testing.assert_close(saved["state"][number][key], value, rtol=0, atol=1e-9)


def test_a_checkpoint_of_one_tensor_per_layer_resumes_the_packed_optimizer_exactly(tiny_model_dir):
    """The checkpoint format is one optimizer entry per layer's A and B: loading it into the packed optimizer,
    and saving that again, gives back the same state, and the next step is the same as the per-layer one's."""
    unet, _, step, _, (params, optimizer, _) = tiny_step(tiny_model_dir)
    step(torch.tensor([[0, 1], [2, 3]]))
    saved = cxr.train.step.optimizer_state_dict(optimizer, unet)
    # a fresh packed step, loaded from the per-layer state
    other, _, fresh, _, (_, fresh_optimizer, _) = tiny_step(tiny_model_dir)
    lora.load_lora_state_dict(other, lora.lora_state_dict(unet))
    cxr.train.step.load_optimizer_state(fresh_optimizer, saved, other)
    for ours, theirs in zip(fresh_optimizer.param_groups[0]["params"], params):
        for key, value in optimizer.state[theirs].items():
            assert torch.equal(fresh_optimizer.state[ours][key], value), key
    again = cxr.train.step.optimizer_state_dict(fresh_optimizer, other)
    for number, state in saved["state"].items():
        assert all(torch.equal(again["state"][number][key], value) for key, value in state.items())
    fresh.generator.set_state(step.generator.get_state())
    for run in (step, fresh):
        run(torch.tensor([[4, 5], [6, 7]]))
    assert all(torch.equal(a, b) for a, b in zip(params, fresh_optimizer.param_groups[0]["params"]))
