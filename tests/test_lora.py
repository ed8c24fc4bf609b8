"""cxr.model.lora against references: closed-form math, peft's LoRA layers, and stock diffusers `load_lora_weights`."""

import json

import pytest
import torch
from torch import nn

from cxr.model import adapter_convert, adapter_files, lora
from cxr.model.lora import AdapterError

RANK, ALPHA = 4, 8.0  # rank != alpha on purpose: a lost alpha shows up as a 2x wrong update


_UNETS = {}


def _load_unet(model_dir):
    """A fresh copy of the tiny pipeline's UNet (read from disk once per session, then deep-copied)."""
    import copy

    from diffusers import UNet2DConditionModel

    if model_dir not in _UNETS:
        _UNETS[model_dir] = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
    return copy.deepcopy(_UNETS[model_dir])


def _randomize_b(unet, seed=1, std=0.05):
    """Give every lora_B a non-zero value (fresh adapters have B = 0 and change nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora.lora_modules(unet).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * std)


def _trained_unet(model_dir, rank=RANK, alpha=ALPHA, targets=lora.DEFAULT_TARGETS):
    unet = _load_unet(model_dir)
    torch.manual_seed(0)
    lora.inject_lora(unet, rank=rank, alpha=alpha, targets=targets)
    _randomize_b(unet)
    return unet


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def unet_inputs():
    """Two latents at different timesteps; 16x16 latents and 8 context tokens keep the UNet forward cheap."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    timesteps = torch.tensor([10, 500])
    context = torch.randn(2, 8, 32, generator=generator)
    return sample, timesteps, context


def _run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def _state_snapshot(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _assert_unchanged(unet, snapshot):
    state = unet.state_dict()
    assert sorted(state) == sorted(snapshot)
    assert all(torch.equal(state[k], snapshot[k]) for k in snapshot)
    assert not lora.lora_modules(unet)


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


# ------------------------------------------------------------------------------------------ the layer


def test_layer_matches_closed_form_with_scale_and_dropout_off():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    layer = lora.LoRALinear(base, rank=4, alpha=6.0)
    nn.init.normal_(layer.lora_B)
    layer.scale = 0.5
    x = torch.randn(3, 7, 16)
    expected = x @ base.weight.T + base.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * (6.0 / 4) * 0.5
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert not base.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad


def test_init_is_nn_linear_kaiming_uniform_and_b_is_zero():
    base = nn.Linear(40, 24)
    torch.manual_seed(5)
    layer = lora.LoRALinear(base, rank=4, alpha=4)
    torch.manual_seed(5)
    reference = nn.Linear(40, 4, bias=False)  # nn.Linear's init is kaiming_uniform_(a=sqrt(5)), as in peft/loralib
    assert torch.equal(layer.lora_A, reference.weight)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_bf16_base_without_autocast_computes_update_in_float32():
    torch.manual_seed(0)
    base = nn.Linear(32, 32).to(torch.bfloat16)
    layer = lora.LoRALinear(base, rank=4, alpha=8.0)
    nn.init.normal_(layer.lora_B, std=1e-3)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    out = layer(x)
    expected = torch.add(base(x), (x.float() @ layer.lora_A.T @ layer.lora_B.T).to(torch.bfloat16), alpha=2.0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_autocast_bf16_runs_matmuls_in_bf16_close_to_float32():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 32), rank=4, alpha=4.0)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x), atol=5e-2, rtol=2e-2)


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(16, 24).to(torch.bfloat16), rank=4, alpha=8.0, dropout=0.1)
    nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    layer.eval()
    assert torch.equal(compiled(x), layer(x))
    layer.train()
    compiled(x).float().sum().backward()
    assert layer.lora_A.grad is not None and layer.base.weight.grad is None


def test_ddp_trains_only_lora_and_state_dict_keys_are_plain(tiny_model_dir, unet_inputs, tmp_path):
    import torch.distributed as dist

    unet = _trained_unet(tiny_model_dir)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(unet)
        wrapped(*unet_inputs).sample.square().mean().backward()
    finally:
        dist.destroy_process_group()
    grads = {name for name, p in unet.named_parameters() if p.grad is not None}
    assert grads == {name for name, p in unet.named_parameters() if "lora_" in name}
    assert all(p.grad.abs().sum() > 0 for p in lora.lora_parameters(unet))
    assert sorted(lora.lora_state_dict(wrapped)) == sorted(lora.lora_state_dict(unet))


# ------------------------------------------------------------------------------------------ injection


def test_injection_paths_freezing_and_reproducible_init(tiny_model_dir):
    unet = _load_unet(tiny_model_dir)
    torch.manual_seed(3)
    paths = lora.inject_lora(unet, rank=RANK, alpha=ALPHA)
    attentions = [n for n, m in _load_unet(tiny_model_dir).named_modules() if n.endswith((".attn1", ".attn2"))]
    assert paths == sorted(f"{a}.{t}" for a in attentions for t in lora.DEFAULT_TARGETS)
    # The trainable tensors are the pack's few; every layer's A and B is its own part of one of them.
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    params = lora.lora_parameters(unet)
    assert sorted(map(id, trainable.values())) == sorted(map(id, params)) and len(params) < len(paths)
    assert all(n.startswith(f"{lora.PACK_NAME}.") for n in trainable)
    layers = [getattr(lora.lora_modules(unet)[p], f"lora_{ab}") for p in paths for ab in "AB"]
    assert sum(t.numel() for t in layers) == sum(p.numel() for p in params)
    for tensor, (holder, view) in zip(layers, lora.layer_slots(unet)):
        assert tensor.untyped_storage().data_ptr() == holder.untyped_storage().data_ptr()
        assert torch.equal(tensor, view(holder.detach()))

    again = _load_unet(tiny_model_dir)
    torch.manual_seed(3)
    lora.inject_lora(again, rank=RANK, alpha=ALPHA)
    assert all(torch.equal(a, b) for a, b in zip(params, lora.lora_parameters(again)))
    other = _load_unet(tiny_model_dir)
    torch.manual_seed(4)
    lora.inject_lora(other, rank=RANK, alpha=ALPHA)
    assert not torch.equal(params[0], lora.lora_parameters(other)[0])


def test_inject_twice_and_unknown_targets_are_errors(tiny_model_dir):
    unet = _load_unet(tiny_model_dir)
    lora.inject_lora(unet, rank=RANK, alpha=ALPHA, targets=["to_q"])
    with pytest.raises(AdapterError, match="already has .* LoRA layers"):
        lora.inject_lora(unet, rank=RANK, alpha=ALPHA)
    with pytest.raises(AdapterError, match=r"\['to_x', 'ff'\] match no linear layer"):
        lora.inject_lora(_load_unet(tiny_model_dir), rank=RANK, alpha=ALPHA, targets=["to_q", "to_x", "ff"])
    # the --lora_targets string form is split at commas, not iterated by character
    assert lora.inject_lora(
        _load_unet(tiny_model_dir), rank=RANK, alpha=ALPHA, targets="to_q, to_v"
    ) == lora.target_paths(unet, ["to_q", "to_v"])


def test_zero_b_gives_exactly_the_base_output(tiny_model_dir, unet_inputs):
    unet = _load_unet(tiny_model_dir)
    expected = _run(unet, unet_inputs)
    lora.inject_lora(unet, rank=RANK, alpha=ALPHA)
    assert torch.equal(_run(unet, unet_inputs), expected)


def test_matches_peft_lora_with_same_weights(tiny_model_dir, unet_inputs):
    from peft import LoraConfig, inject_adapter_in_model

    ours = _trained_unet(tiny_model_dir, rank=RANK, alpha=ALPHA)
    paths = list(lora.lora_modules(ours))
    reference = inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=paths, init_lora_weights=False), _load_unet(tiny_model_dir)
    )
    with torch.no_grad():
        for path, module in lora.lora_modules(ours).items():
            peft_layer = reference.get_submodule(path)
            peft_layer.lora_A["default"].weight.copy_(module.lora_A)
            peft_layer.lora_B["default"].weight.copy_(module.lora_B)
    base = _run(_load_unet(tiny_model_dir), unet_inputs)
    expected = _run(reference, unet_inputs)
    assert (expected - base).abs().max() > 1e-2  # the adapter does change the output
    torch.testing.assert_close(_run(ours, unet_inputs), expected)


def test_attention_processor_matches_peft_forward_and_backward(tiny_model_dir, unet_inputs):
    """LoRAAttnProcessor (q/k/v down-projections in one matmul, each update added inside its addmm) gives peft's
    outputs and LoRA gradients: the same math in fewer kernels."""
    from peft import LoraConfig, inject_adapter_in_model

    ours = _trained_unet(tiny_model_dir, rank=RANK, alpha=ALPHA)
    assert {type(p).__name__ for p in ours.attn_processors.values()} == {"LoRAAttnProcessor"}
    modules = lora.lora_modules(ours)
    reference = inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(modules), init_lora_weights=False),
        _load_unet(tiny_model_dir),
    )
    pairs = []
    with torch.no_grad():
        for path, module in modules.items():
            peft_layer = reference.get_submodule(path)
            for index, (ours_weight, theirs) in enumerate(
                ((module.lora_A, peft_layer.lora_A), (module.lora_B, peft_layer.lora_B))
            ):
                theirs["default"].weight.copy_(ours_weight)
                pairs.append((module, index, theirs["default"].weight))
    outputs = []
    for unet in (ours, reference):
        out = unet(*unet_inputs).sample
        out.square().mean().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[0], outputs[1])
    for module, index, theirs in pairs:
        torch.testing.assert_close(module.lora_grads()[index], theirs.grad, rtol=1e-4, atol=1e-7)


def test_linear_outputs_of_one_input_take_one_matmul_for_the_down_projections():
    """Layers that read one input: LoRA, plain, LoRA without bias and another rank, merged LoRA. Each output is
    its closed form; the two active LoRA layers' down-projections are one matmul, their up-projections are the
    addmm that adds them to the base output."""
    from cxr.perf.bench_ops import OpCounter

    torch.manual_seed(0)
    layers = [
        lora.LoRALinear(nn.Linear(8, 6), rank=2, alpha=3.0),
        nn.Linear(8, 5),
        lora.LoRALinear(nn.Linear(8, 4, bias=False), rank=3, alpha=3.0),
        lora.LoRALinear(nn.Linear(8, 6), rank=2, alpha=2.0),
    ]
    for layer in layers:
        if isinstance(layer, lora.LoRALinear):
            nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8)
    expected = [layer(x) for layer in layers]
    layers[3].merge()
    counter = OpCounter([])
    with counter, torch.no_grad():
        got = lora.linear_outputs(layers, x)
    for out, layer, reference in zip(got, layers, expected):
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
        if isinstance(layer, lora.LoRALinear) and not layer.merged:
            closed = x @ layer.base.weight.T + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
            closed = closed + (layer.base.bias if layer.base.bias is not None else 0)
            torch.testing.assert_close(out, closed, rtol=1e-5, atol=1e-6)
    # mm: the shared down-projection and the bias-free base layer; addmm: 3 biased bases + 2 LoRA up-projections
    assert counter.count.total["mm"] == 2 and counter.count.total["addmm"] == 5


def test_dropout_draws_its_masks_from_the_layer_generator():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(8, 8), rank=2, alpha=2.0, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 8)

    def masked(seed):
        layer.dropout_generator = torch.Generator().manual_seed(seed)
        return layer(x)

    global_state = torch.get_rng_state()
    first, again, other = masked(1), masked(1), masked(2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is not touched
    layer.eval()
    no_dropout = x @ layer.base.weight.T + layer.base.bias + x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), no_dropout)


def test_merge_equals_unmerged_and_unmerge_restores_base(tiny_model_dir, unet_inputs):
    unet = _trained_unet(tiny_model_dir)
    lora.set_lora_scale(unet, 0.7)
    unmerged = _run(unet, unet_inputs)
    weights = {p: m.base.weight.detach().clone() for p, m in lora.lora_modules(unet).items()}
    lora.merge_lora(unet)
    assert all(m.merged for m in lora.lora_modules(unet).values())
    torch.testing.assert_close(_run(unet, unet_inputs), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(AdapterError, match="merged"):
        lora.set_lora_scale(unet, 1.0)
    lora.unmerge_lora(unet)
    for path, module in lora.lora_modules(unet).items():
        torch.testing.assert_close(module.base.weight, weights[path], atol=1e-6, rtol=0)
    torch.testing.assert_close(_run(unet, unet_inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_scale_zero_is_base_and_scale_is_linear(tiny_model_dir):
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(8, 8), rank=2, alpha=4.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 8)
    full = layer(x)
    lora.set_lora_scale(layer, 0.0)
    assert torch.equal(layer(x), layer.base(x))
    lora.set_lora_scale(layer, 0.25)
    torch.testing.assert_close(layer(x) - layer.base(x), 0.25 * (full - layer.base(x)))


def test_lora_state_dict_round_trip_and_strictness(tiny_model_dir):
    source = _trained_unet(tiny_model_dir)
    state = lora.lora_state_dict(source)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    target = _load_unet(tiny_model_dir)
    lora.inject_lora(target, rank=RANK, alpha=ALPHA)
    lora.load_lora_state_dict(target, state)
    assert all(torch.equal(a, b) for a, b in zip(lora.lora_parameters(source), lora.lora_parameters(target)))
    missing = dict(list(state.items())[1:])
    with pytest.raises(AdapterError, match="missing"):
        lora.load_lora_state_dict(target, missing)
    key = next(iter(state))
    with pytest.raises(AdapterError, match="shapes"):
        lora.load_lora_state_dict(target, {**state, key: torch.zeros(1, 1)})


# ------------------------------------------------------------------------------------------ files


def test_diffusers_load_lora_weights_reproduces_our_output(tiny_model_dir, unet_inputs, tmp_path):
    """THE export test: a stock pipeline loading our folder gives our UNet output, so alpha != rank survives."""
    from diffusers import StableDiffusionPipeline

    unet = _trained_unet(tiny_model_dir)
    ours = _run(unet, unet_inputs)
    out_dir = tmp_path / "lora_unet"
    files = adapter_files.save_adapter(
        unet,
        out_dir,
        rank=RANK,
        alpha=ALPHA,
        targets=lora.DEFAULT_TARGETS,
        metadata={"model_id": "tiny", "resolution": "256"},
    )
    assert files == [out_dir / adapter_files.DIFFUSERS_WEIGHT_NAME]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(str(out_dir))
    theirs = _run(pipe.unet, unet_inputs)
    base = _run(_load_unet(tiny_model_dir), unet_inputs)
    assert (ours - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() < 1e-5

    tensors, header = _read(files[0])
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    config = json.loads(header["lora_adapter_metadata"])
    assert config["unet.r"] == RANK and config["unet.lora_alpha"] == ALPHA
    assert header["cxr.model_id"] == "tiny" and header["cxr.resolution"] == "256"
    assert header["cxr.rank"] == str(RANK) and header["cxr.alpha"] == "8.0"
    assert header["cxr.targets"] == "to_k,to_out.0,to_q,to_v"


def test_header_is_what_carries_alpha(tiny_model_dir, unet_inputs, tmp_path):
    """Control for the test above: without the header diffusers uses alpha = rank, and so do we."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    unet = _trained_unet(tiny_model_dir)
    ours = _run(unet, unet_inputs)
    tensors, _ = _read(
        adapter_files.save_adapter(unet, tmp_path / "full", rank=RANK, alpha=ALPHA, targets=lora.DEFAULT_TARGETS)[0]
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(tensors, str(bare / adapter_files.DIFFUSERS_WEIGHT_NAME))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(str(bare))
    theirs = _run(pipe.unet, unet_inputs)
    assert (ours - theirs).abs().max() > 1e-3
    reloaded = _load_unet(tiny_model_dir)
    info = adapter_files.load_adapter(reloaded, bare)
    assert info.alpha == RANK
    assert (_run(reloaded, unet_inputs) - theirs).abs().max() < 1e-5


def test_kohya_export_loads_in_diffusers_the_same(tiny_model_dir, unet_inputs, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = _trained_unet(tiny_model_dir)
    ours = _run(unet, unet_inputs)
    files = adapter_files.save_adapter(
        unet, tmp_path, rank=RANK, alpha=ALPHA, targets=lora.DEFAULT_TARGETS, export_format="both"
    )
    assert [f.name for f in files] == [adapter_files.DIFFUSERS_WEIGHT_NAME, adapter_files.KOHYA_WEIGHT_NAME]
    tensors, header = _read(files[1])
    assert all(
        k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors
    )
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in tensors
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {ALPHA}
    assert header["ss_network_dim"] == str(RANK)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path), weight_name=adapter_files.KOHYA_WEIGHT_NAME)
    assert (_run(pipe.unet, unet_inputs) - ours).abs().max() < 1e-5

    reloaded = _load_unet(tiny_model_dir)
    info = adapter_files.load_adapter(reloaded, files[1])
    assert (info.format, info.rank, info.alpha) == ("kohya", RANK, ALPHA)
    assert (_run(reloaded, unet_inputs) - ours).abs().max() < 1e-6


def test_save_load_save_is_byte_stable_and_info_is_complete(tiny_model_dir, unet_inputs, tmp_path):
    import hashlib

    unet = _trained_unet(tiny_model_dir, targets=["to_q", "to_v"])
    first = adapter_files.save_adapter(
        unet,
        tmp_path / "a",
        rank=RANK,
        alpha=ALPHA,
        targets=["to_v", "to_q"],
        metadata={"cxr.prompt": "chest x-ray, normal"},
    )[0]
    reloaded = _load_unet(tiny_model_dir)
    info = adapter_files.load_adapter(reloaded, tmp_path / "a", scale=0.5)
    assert (info.rank, info.alpha, info.targets, info.format) == (RANK, ALPHA, ["to_q", "to_v"], "diffusers")
    assert info.paths == sorted(lora.lora_modules(unet))
    assert info.sha256 == hashlib.sha256(first.read_bytes()).hexdigest()
    assert info.metadata["cxr.prompt"] == "chest x-ray, normal"
    assert all(m.scale == 0.5 for m in lora.lora_modules(reloaded).values())

    lora.set_lora_scale(reloaded, 1.0)
    torch.testing.assert_close(_run(reloaded, unet_inputs), _run(unet, unet_inputs), atol=0, rtol=0)
    second = adapter_files.save_adapter(reloaded, tmp_path / "b", rank=RANK, alpha=ALPHA, targets=info.targets)[0]
    (t1, _), (t2, _) = _read(first), _read(second)
    assert list(t1) == list(t2)
    assert all(t1[k].numpy().tobytes() == t2[k].numpy().tobytes() for k in t1)


def test_conversion_command_round_trip_is_byte_stable(tiny_model_dir, tmp_path, capsys):
    unet = _trained_unet(tiny_model_dir)
    saved = adapter_files.save_adapter(
        unet,
        tmp_path / "orig",
        rank=RANK,
        alpha=ALPHA,
        targets=lora.DEFAULT_TARGETS,
        metadata={"steps": "10"},
        export_format="both",
    )
    kohya_file = tmp_path / "k.safetensors"
    assert (
        adapter_convert.main(
            ["to-kohya", str(tmp_path / "orig" / adapter_files.DIFFUSERS_WEIGHT_NAME), str(kohya_file)]
        )
        == 0
    )
    assert adapter_convert.main(["to-diffusers", str(kohya_file), str(tmp_path / "back")]) == 0
    assert str(kohya_file) in capsys.readouterr().out
    for original, converted in (
        (saved[1], kohya_file),
        (saved[0], tmp_path / "back" / adapter_files.DIFFUSERS_WEIGHT_NAME),
    ):
        (a, header_a), (b, header_b) = _read(original), _read(converted)
        assert list(a) == list(b) and all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)
        assert header_a == header_b  # cxr.* provenance and rank/alpha survive the conversions


def test_float16_export_loads_as_float32_master_weights(tiny_model_dir, tmp_path):
    unet = _trained_unet(tiny_model_dir)
    file = adapter_files.save_adapter(
        unet, tmp_path, rank=RANK, alpha=ALPHA, targets=lora.DEFAULT_TARGETS, dtype="float16"
    )[0]
    assert {t.dtype for t in _read(file)[0].values()} == {torch.float16}
    reloaded = _load_unet(tiny_model_dir)
    adapter_files.load_adapter(reloaded, file)
    for path, module in lora.lora_modules(reloaded).items():
        assert module.lora_B.dtype == torch.float32
        torch.testing.assert_close(module.lora_B, lora.lora_modules(unet)[path].lora_B.half().float(), atol=0, rtol=0)


def test_load_into_unet_that_already_has_lora(tiny_model_dir, unet_inputs, tmp_path):
    source = _trained_unet(tiny_model_dir)
    adapter_files.save_adapter(source, tmp_path, rank=RANK, alpha=ALPHA, targets=lora.DEFAULT_TARGETS)
    target = _load_unet(tiny_model_dir)
    lora.inject_lora(target, rank=RANK, alpha=1.0)
    info = adapter_files.load_adapter(target, tmp_path)
    assert all(m.alpha == ALPHA for m in lora.lora_modules(target).values()) and info.alpha == ALPHA
    torch.testing.assert_close(_run(target, unet_inputs), _run(source, unet_inputs), atol=0, rtol=0)
    lora.merge_lora(target)
    with pytest.raises(AdapterError, match="merged"):
        adapter_files.load_adapter(target, tmp_path)


def _write_pickle(directory, tensors):
    path = directory / "adapter.bin"
    torch.save(tensors, path)
    return path


def _write_pickle_named_safetensors(directory, tensors):
    path = directory / "adapter.safetensors"
    torch.save(tensors, path)
    return path


def _write_non_lora(directory, tensors):
    from safetensors.torch import save_file

    path = directory / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4), "conv_in.bias": torch.zeros(4)}, str(path))
    return path


def _write_variant(change):
    def write(directory, tensors):
        from safetensors.torch import save_file

        path = directory / adapter_files.DIFFUSERS_WEIGHT_NAME
        save_file(change(dict(tensors)), str(path))
        return path

    return write


def _wrong_shapes(tensors):
    return {
        k: torch.zeros(v.shape[0], v.shape[1] * 2) if k.endswith("lora_A.weight") else v for k, v in tensors.items()
    }


def _unknown_module(tensors):
    key = next(iter(tensors))
    return {
        **tensors,
        "unet.conv_in.lora_A.weight": torch.zeros(RANK, 4),
        "unet.conv_in.lora_B.weight": torch.zeros(4, RANK),
        key: tensors[key],
    }


def _stray_key(tensors):
    return {**tensors, "unet.down_blocks.0.extra_scale": torch.zeros(1)}


def _missing_pair(tensors):
    return {k: v for k, v in tensors.items() if "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v" not in k}


def _missing_half(tensors):
    return {
        k: v
        for k, v in tensors.items()
        if k != "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight"
    }


def _mixed_ranks(tensors):
    out = dict(tensors)
    out["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight"] = torch.zeros(2, 64)
    out["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight"] = torch.zeros(64, 2)
    return out


def _text_encoder(tensors):
    return {**tensors, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(RANK, 32)}


@pytest.mark.parametrize(
    "write, message",
    [
        (_write_pickle, r"only \.safetensors adapters are loaded .*never unpickled"),
        (_write_pickle_named_safetensors, "not a readable safetensors file"),
        (_write_non_lora, r"not a LoRA adapter .*conv_in\.bias"),
        (_write_variant(_wrong_shapes), r"shapes do not fit this UNet .*attn1\.to_k: A \(4, 64\)"),
        (_write_variant(_unknown_module), r"no LoRA target at: \[conv_in\]"),
        (_write_variant(_stray_key), r"unknown keys \[unet\.down_blocks\.0\.extra_scale\]"),
        (
            _write_variant(_missing_pair),
            r"missing LoRA weights for \[up_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_v\]",
        ),
        (_write_variant(_missing_half), r"missing half: \[unet\.mid_block.*attn1\.to_k \(has only lora_A\)\]"),
        (_write_variant(_mixed_ranks), r"different ranks \[2, 4\]"),
        (_write_variant(_text_encoder), "text-encoder LoRA keys"),
    ],
    ids=[
        "pickle",
        "pickle-renamed",
        "non-lora",
        "wrong-shapes",
        "unknown-module",
        "stray-key",
        "missing-pair",
        "missing-half",
        "mixed-ranks",
        "text-encoder",
    ],
)
def test_bad_files_are_refused_and_leave_the_unet_unchanged(tiny_model_dir, tmp_path, write, message):
    source = _trained_unet(tiny_model_dir)
    tensors, _ = _read(
        adapter_files.save_adapter(source, tmp_path / "good", rank=RANK, alpha=ALPHA, targets=lora.DEFAULT_TARGETS)[0]
    )
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad_file = write(bad_dir, tensors)
    unet = _load_unet(tiny_model_dir)
    snapshot = _state_snapshot(unet)
    for target in (bad_file, bad_dir):
        with pytest.raises(AdapterError, match=message) as error:
            adapter_files.load_adapter(unet, target)
        assert str(bad_file) in str(error.value)
        _assert_unchanged(unet, snapshot)


def test_adapter_for_another_base_model_is_refused(tiny_model_dir, tmp_path):
    """An adapter trained on a UNet with other widths (a different base) names the misfit and changes nothing."""
    from diffusers import UNet2DConditionModel

    from cxr.model.tiny import _unet_config

    other = UNet2DConditionModel(**{**_unet_config("tiny"), "block_out_channels": (16, 32), "norm_num_groups": 4})
    lora.inject_lora(other, rank=RANK, alpha=ALPHA)
    adapter_files.save_adapter(other, tmp_path, rank=RANK, alpha=ALPHA, targets=lora.DEFAULT_TARGETS)
    unet = _load_unet(tiny_model_dir)
    snapshot = _state_snapshot(unet)
    with pytest.raises(AdapterError, match=r"shapes do not fit this UNet .*vs base layer 32x32"):
        adapter_files.load_adapter(unet, tmp_path)
    _assert_unchanged(unet, snapshot)


def test_folder_resolution(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no pytorch_lora_weights.safetensors or other"):
        adapter_files.resolve_adapter_file(tmp_path / "empty")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (two / name).write_bytes(b"")
    with pytest.raises(AdapterError, match="several .safetensors files"):
        adapter_files.resolve_adapter_file(two)
    (two / adapter_files.DIFFUSERS_WEIGHT_NAME).write_bytes(b"")
    assert adapter_files.resolve_adapter_file(two) == two / adapter_files.DIFFUSERS_WEIGHT_NAME
    with pytest.raises(AdapterError, match="no such adapter"):
        adapter_files.resolve_adapter_file(tmp_path / "nope.safetensors")


def test_sd15_parameter_count_at_rank_16_and_kohya_names():
    from diffusers import UNet2DConditionModel

    from cxr.model.tiny import _unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_unet_config("sd15"))
    total = sum(p.numel() for p in unet.parameters())
    paths = lora.inject_lora(unet, rank=16, alpha=16)
    count = lora.trainable_parameter_count(unet)
    # closed form: rank * (in + out) per wrapped projection
    assert count == sum(16 * (m.in_features + m.out_features) for m in lora.lora_modules(unet).values())
    assert len(paths) == 128 and count == 3_188_736
    print(
        f"SD v1.5 UNet, rank 16, {len(paths)} projections: {count:,} trainable LoRA parameters "
        f"({100 * count / total:.2f}% of {total:,})"
    )
    assert all(adapter_files.path_from_kohya_name(adapter_files.kohya_name(p)) == p for p in paths)


def test_same_file_layout_as_diffusers_save_lora_weights_and_reads_its_files(tiny_model_dir, unet_inputs, tmp_path):
    """diffusers' own writer is the reference: same tensors and same lora_adapter_metadata JSON; and a file it
    writes from a peft-adapted UNet (full LoraConfig.to_dict() header) loads into ours with the same output."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = _trained_unet(tiny_model_dir)
    paths = list(lora.lora_modules(unet))
    ours, our_header = _read(
        adapter_files.save_adapter(unet, tmp_path / "ours", rank=RANK, alpha=ALPHA, targets=lora.DEFAULT_TARGETS)[0]
    )
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "reference",
        unet_lora_layers={k.removeprefix("unet."): v for k, v in ours.items()},
        unet_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA, "target_modules": paths},
    )
    reference, reference_header = _read(tmp_path / "reference" / adapter_files.DIFFUSERS_WEIGHT_NAME)
    assert list(ours) == list(reference) and all(torch.equal(ours[k], reference[k]) for k in ours)
    assert our_header["lora_adapter_metadata"] == reference_header["lora_adapter_metadata"]

    peft_unet = _load_unet(tiny_model_dir)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q", "to_v"], init_lora_weights=False)
    peft_unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "from_peft",
        unet_lora_layers=get_peft_model_state_dict(peft_unet),
        unet_lora_adapter_metadata=config.to_dict(),
    )
    loaded = _load_unet(tiny_model_dir)
    info = adapter_files.load_adapter(loaded, tmp_path / "from_peft")
    assert (info.rank, info.alpha, info.targets) == (RANK, ALPHA, ["to_q", "to_v"])
    expected = _run(peft_unet, unet_inputs)
    assert (expected - _run(_load_unet(tiny_model_dir), unet_inputs)).abs().max() > 1e-2
    assert (_run(loaded, unet_inputs) - expected).abs().max() < 1e-5


def _ldm_names(tensors):
    return {
        k.replace("lora_unet_down_blocks_0_attentions_0_", "lora_unet_input_blocks_1_1_"): v for k, v in tensors.items()
    }


def _mixed_alphas(tensors):
    key = next(k for k in tensors if k.endswith(".alpha"))
    return {**tensors, key: torch.tensor(1.0)}


def _missing_alpha(tensors):
    key = next(k for k in tensors if k.endswith(".alpha"))
    return {k: v for k, v in tensors.items() if k != key}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            _ldm_names,
            r"kohya key 'lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k' is not an attention projection",
        ),
        (_mixed_alphas, r"different or non-scalar alphas \[1\.0, 8\.0\]"),
        (_missing_alpha, r"alpha missing for \[lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k\]"),
    ],
    ids=["ldm-names", "mixed-alphas", "missing-alpha"],
)
def test_bad_kohya_files_are_refused_and_leave_the_unet_unchanged(tiny_model_dir, tmp_path, change, message):
    from safetensors.torch import save_file

    source = _trained_unet(tiny_model_dir)
    good = adapter_files.save_adapter(
        source, tmp_path, rank=RANK, alpha=ALPHA, targets=lora.DEFAULT_TARGETS, export_format="kohya"
    )[0]
    bad = tmp_path / "bad.safetensors"
    save_file(change(_read(good)[0]), str(bad))
    unet = _load_unet(tiny_model_dir)
    snapshot = _state_snapshot(unet)
    with pytest.raises(AdapterError, match=message):
        adapter_files.load_adapter(unet, bad)
    _assert_unchanged(unet, snapshot)
