"""Issue #15: the training step is wired in one place, and loading the model leaves the global RNG alone."""

import re
from pathlib import Path

import torch

from cxr.config import TrainConfig
from cxr.model.loading import load_components
from cxr.model.lora import inject_lora, lora_state_dict
from cxr.train import training

REPO = Path(__file__).resolve().parents[1]


def test_the_step_is_wired_only_by_build_train_step():
    """Training, the benchmark and the tests build the step through cxr.train.step.build_train_step: nothing else calls
    make_train_step or make_optimizer, so the benchmark cannot time a different step from the one that trains."""
    wired_by_hand = []
    for path in sorted([*(REPO / "cxr").glob("*.py"), *(REPO / "tests").glob("*.py")]):
        if path.name in ("step.py", Path(__file__).name):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(make_train_step|make_optimizer)\(", line):
                wired_by_hand.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert wired_by_hand == []


def test_load_model_inits_lora_from_the_seed_and_leaves_the_global_rng_alone(tiny_model_dir):
    cfg = TrainConfig(dataset_dir=Path("."), model_id=str(tiny_model_dir), seed=7, lora_rank=4, lora_alpha=4.0)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    components, _ = training._load_model(cfg, torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), before), "_load_model changed the global torch RNG"

    # The same values as before the fix: the A init draws from torch.manual_seed(--seed).
    reference = load_components(str(tiny_model_dir), names=("unet",))["unet"]
    torch.manual_seed(cfg.seed)
    inject_lora(reference, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_target_list)
    expected, got = lora_state_dict(reference), lora_state_dict(components["unet"])
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
