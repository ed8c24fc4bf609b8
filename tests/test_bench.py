"""cxr.perf.bench: the tiny benchmark produces the expected table; FLOP counting and the memory window are right.

No timing assertions: the machine is shared. Figures are checked for being present, positive and finite.
"""

import math

import pytest
import torch

from cxr import runtime
from cxr.perf import bench, bench_context, bench_memory, bench_ops, bench_sections

TIMED_ROWS = {
    ("train", "our step, cached latents"),
    ("train", "encode every step"),
    ("lora", "our LoRA"),
    ("lora", "peft LoRA"),
    ("memory", "training process"),
    ("input", "decode+resize, 0 workers"),
    ("input", "decode+resize, 1 workers"),
    ("cache", "build, 1 workers"),
    ("cache", "reload (cache hit)"),
    ("sampling", "txt2img, merged LoRA"),
}
OPS_ROWS = {("ops", "aten ops per step"), ("ops", "on LoRA tensors")}
COUNTED_MEMORY_ROWS = {("activations", "saved for backward (counted)"), ("activations", "training lower bound (sum)")}
FLOP_ROWS = {
    ("flops", name)
    for name in (
        "unet_forward",
        "unet_forward_backward",
        "vae_encoder",
        "text_encoder",
        "cached_step",
        "encode_every_step",
    )
}


def _positive(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_tiny_bench_has_every_row_with_positive_finite_figures(tmp_path, one_thread):
    cfg = bench.BenchConfig(
        arch="tiny",
        batch_size=2,
        steps=1,
        warmup=1,
        repeats=1,
        workers="0,1",
        input_images=4,
        input_size=256,
        cache_images=2,
        cache_rows=16,
        sample_steps=2,
        out=tmp_path / "bench.json",
    )
    cfg.validate()
    result = bench.run_bench(cfg, log=lambda *a, **k: None)
    rows = [bench.Row(**r) for r in result["rows"]]
    keys = {(r.section, r.variant) for r in rows}
    assert keys == TIMED_ROWS | FLOP_ROWS | OPS_ROWS | COUNTED_MEMORY_ROWS | {
        ("peak", "matmul float32"),
        ("cuda", "skipped"),
    }
    saved, total = (
        next(r.peak_mem_mb for r in rows if (r.section, r.variant) == key) for key in sorted(COUNTED_MEMORY_ROWS)
    )
    assert _positive(saved) and total > saved

    for row in rows:
        if (row.section, row.variant) in TIMED_ROWS:
            assert _positive(row.images_per_s) and _positive(row.ms_per_step) and _positive(row.peak_mem_mb), row
            assert row.images_per_s == pytest.approx(
                (
                    cfg.batch_size
                    if row.section in ("train", "lora", "memory", "sampling")
                    else cfg.input_images
                    if row.section == "input"
                    else cfg.cache_images
                )
                / (row.ms_per_step / 1000)
            )
        if row.gflop_per_image is not None:
            assert _positive(row.gflop_per_image), row
        if row.tflop_per_s is not None and row.images_per_s is not None:
            assert row.tflop_per_s == pytest.approx(row.gflop_per_image * row.images_per_s / 1000)
            assert row.percent_of_peak == pytest.approx(100 * row.tflop_per_s / result["rows"][0]["tflop_per_s"])

    flops = result["flops"]
    # Backward through a frozen base computes input gradients only: between 1x and 2x the forward again.
    assert 2.0 * flops["unet_forward"] < flops["unet_forward_backward"] < 3.2 * flops["unet_forward"]
    assert flops["encode_every_step"] == flops["cached_step"] + flops["vae_encoder"] + flops["text_encoder"]
    assert set(result["speedups"]) == {"cached_vs_encode_every_step", "our_lora_vs_peft"}
    assert all(_positive(v) for v in result["speedups"].values())


def test_main_writes_json_and_a_markdown_table(tmp_path, capsys):
    out = tmp_path / "peak.json"
    result = bench.main(["--sections", "peak", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| peak | matmul float32 |" in printed
    assert out.exists() and _positive(result["rows"][0]["tflop_per_s"])


def test_count_flops_matches_closed_form_for_linear_conv_and_cpu_attention():
    batch, tokens, heads, dim = 2, 64, 4, 16
    linear = torch.nn.Linear(32, 48)
    x = torch.randn(batch, tokens, 32)
    assert bench_sections.count_flops(lambda: linear(x)) == 2 * batch * tokens * 32 * 48

    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    image = torch.randn(1, 3, 16, 16)
    assert bench_sections.count_flops(lambda: conv(image)) == 2 * 16 * 16 * 8 * 3 * 3 * 3

    # CPU attention has no FLOP formula in PyTorch; count_flops must still see QK^T and AV.
    q, k, v = (torch.randn(batch, heads, tokens, dim) for _ in range(3))
    counted = bench_sections.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert counted == 2 * (2 * batch * heads * tokens * tokens * dim)


def test_op_counter_attributes_the_lora_branch_of_a_layer_and_nothing_else():
    """A LoRA layer written out, forward + backward on an input that needs no gradient: LoRA's ops are the two
    matmuls of the update, its scale and its add into the base output, and the backward matmuls for A and B;
    the frozen base layer's matmul and what follows the add are not LoRA's."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).requires_grad_(False)
    lora_a, lora_b = torch.nn.Parameter(torch.randn(2, 6)), torch.nn.Parameter(torch.randn(5, 2))
    x = torch.randn(3, 6)
    counter = bench_ops.OpCounter([lora_a, lora_b])
    with counter:
        (base(x) + (x @ lora_a.t() @ lora_b.t()) * 2.0).sum().backward()
    total, lora = counter.count.total, counter.count.lora
    assert lora["mm"] == 2 + 3  # x A^T, h B^T; backward: grad B, grad h, grad A (x needs no gradient)
    assert total["addmm"] == 1 and "addmm" not in lora  # the frozen base layer
    assert lora["add"] == 1 and lora["mul"] == 1 and "sum" not in lora
    assert lora_a.grad is not None and lora_b.grad is not None


def test_ops_section_counts_one_step_of_the_tiny_model(one_thread):
    """The ops section on the tiny architecture: a count for the whole step and for LoRA, the same on a rerun."""
    cfg = bench.BenchConfig(
        arch="tiny", batch_size=1, dtype="fp32", device="cpu", resolution=64, cache_rows=4, sections="ops"
    )
    cfg.validate()
    result = bench.run_bench(cfg, log=lambda *a, **k: None)
    ops = result["ops"]
    assert 0 < ops["lora"] < ops["total"] and 0 < ops["lora_matmuls"] < ops["matmuls"]
    assert {(r["section"], r["variant"]) for r in result["rows"]} == OPS_ROWS
    assert bench.run_bench(cfg, log=lambda *a, **k: None)["ops"] == ops
    # The tiny UNet's 32 LoRA layers in 16 groups of one input: one down-projection matmul per group and one
    # addmm per layer forward, 4 matmuls per group and layer backward (measured: 151; 181 with a matmul each).
    assert ops["lora_matmuls"] <= 160 and ops["total"] <= 1450  # 1833 with one matmul each and the stock attention
    # Its 64 A and B stored as 3 packed tensors: one gradient, norm, clip and AdamW update each, no transposes in
    # the forward (measured: 291 LoRA ops, 196 not views; 518 and 201 with one tensor per A and B).
    assert ops["lora"] <= 320 and ops["lora_not_views"] <= 200


def test_saved_activation_bytes_matches_closed_form():
    """Linear -> ReLU -> Linear on an input without grad: autograd keeps the input (for the first weight's
    gradient) and the ReLU output (for ReLU's and the second weight's gradients: one storage), no weights."""
    batch = 3
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(batch, 8)
    counted = bench_memory.saved_activation_bytes(lambda: model(x), exclude=list(model.parameters()))
    assert counted == 4 * batch * (8 + 16)
    # frozen weights and an input without grad: nothing needs saving
    model.requires_grad_(False)
    assert bench_memory.saved_activation_bytes(lambda: model(x), exclude=list(model.parameters())) == 0


def test_peak_memory_window_resets_on_cpu():
    device = torch.device("cpu")
    if not runtime.reset_peak_memory(device):
        pytest.skip("this kernel does not allow resetting the peak RSS (/proc/self/clear_refs)")
    before = runtime.peak_memory_mib(device)
    block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, written, so resident
    grown = runtime.peak_memory_mib(device)
    del block
    assert runtime.reset_peak_memory(device)
    after = runtime.peak_memory_mib(device)
    assert grown - before > 200
    assert grown - after > 200


def test_time_interleaved_calls_each_variant_warmup_plus_rounds_times():
    calls = {"a": 0, "b": 0}
    order = []

    def make(name):
        def call():
            calls[name] += 1
            order.append(name)

        return call

    timings = bench_context.time_interleaved(
        {"a": make("a"), "b": make("b")}, torch.device("cpu"), warmup=2, steps=3, repeats=4
    )
    assert calls == {"a": 2 + 3 * 4, "b": 2 + 3 * 4}
    assert order[4:] == (["a"] * 3 + ["b"] * 3) * 4  # rounds alternate between the variants
    for timing in timings.values():
        assert len(timing.rounds) == 4
        assert timing.seconds_per_call == pytest.approx(sorted(timing.rounds)[1] / 2 + sorted(timing.rounds)[2] / 2)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--sections", "train,bogus"], "--sections"),
        (["--workers", "0,x"], "--workers"),
        (["--batch_size", "0"], "--batch_size"),
        (["--resolution", "100"], "--resolution"),
    ],
)
def test_invalid_flags_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert flag in capsys.readouterr().err


def test_missing_peft_gives_an_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[test\]'"):
        bench_sections.peft_unet(None)
