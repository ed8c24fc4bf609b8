"""Benchmark: where the time of LoRA training and sampling goes, on the CPU or on CUDA.

    python -m cxr.bench --arch tiny                    # the tiny architecture, CPU: a few minutes at most
    python -m cxr.bench --arch sd15 --batch_size 2 --steps 1 --warmup 1 --repeats 3 \
        --sections peak,flops,train,lora --out bench-sd15-cpu.json          # the CPU comparison in docs/performance.md
    python -m cxr.bench --arch sd15 --batch_size 16 --device cuda --dtype bf16 --steps 20 --warmup 5 \
        --out bench-cuda.json                                              # one GPU, every section

Models are built with random weights from the SD v1.5 (or tiny) architecture (`cxr.model.tiny`); nothing is
downloaded. Sections (`--sections`, comma-separated):

- `peak`: measured dense matmul throughput in the bench dtype, the denominator of "% of peak".
- `flops`: model FLOPs per image counted with `torch.utils.flop_counter.FlopCounterMode` on the models
  being timed (UNet forward, UNet forward + backward with the frozen base and LoRA, VAE encoder, text
  encoder per prompt).
- `train`: our training step (cached latents and prompt embedding resident on the device) against the
  step generic trainers run (VAE-encode the pixel batch and text-encode the prompt every step, then the
  same UNet step), same model, same batch, same run, interleaved.
- `lora`: the same UNet step with our LoRA (`cxr.model.lora`) and with a stock peft LoRA on the same targets.
- `cuda`: eager vs `--cuda_graph` vs `torch.compile` of our step (CUDA only).
- `memory`: the memory budget of training: a child process that holds only what the training loop
  holds (UNet + LoRA + optimizer + latent cache) runs our step.
- `activations`: what the memory budget is made of, counted rather than measured: the bytes autograd saves
  for the backward pass in one forward of our step (at the bench batch and dtype), and their sum with the
  frozen weights, the LoRA + AdamW state and the latent cache: a lower bound of the training peak that
  needs no GPU.
- `input`: decode + resize images/s per DataLoader worker count, over 8-bit PNG phantoms (1024 px, like NIH).
- `cache`: latent-cache build images/s (VAE encoding included) and reload images/s.
- `sampling`: images/s of sampling with classifier-free guidance.

Code: `cxr.perf.bench_context` (settings, the shared models, our training step `cxr.train.step.TrainStep`
built exactly as train() builds it, the interleaved timer), one function per section in `cxr.perf.bench_sections`
(step, LoRA, CUDA, FLOPs, sampling), `cxr.perf.bench_memory`, `cxr.perf.bench_data` and `cxr.perf.bench_ops`, this
module (the table, JSON and command line).

Timing: `--warmup` untimed steps per variant, then `--repeats` rounds of `--steps` timed steps; the
variants of a section are interleaved round by round so that a noisy shared machine hurts them alike;
the figure is the median round. CUDA work is synchronised before every clock read.
Peak memory: on CUDA `torch.cuda.max_memory_allocated`, reset before each timed round. On the CPU the
peak resident set size (VmHWM) of the bench process, reset before each round through
`/proc/self/clear_refs` (Linux); it includes every model resident at the time. Where that reset is not
available the figure is the process-lifetime peak, and the table says so.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cxr.fileio import atomic_write_bytes
from cxr.flags import parse_config
from cxr.perf.bench_context import SECTIONS, BenchConfig, Context, Row, resolve_device_dtype
from cxr.perf.bench_sections import SECTION_FUNCTIONS
from cxr.train.step import configure_cuda

# ----------------------------------------------------------------------------------------------
# Table, JSON, entry point

COLUMNS = (
    ("section", "section", "{}"),
    ("variant", "variant", "{}"),
    ("images_per_s", "images/s", "{:.3g}"),
    ("ms_per_step", "ms/step", "{:.4g}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("gflop_per_image", "GFLOP/img", "{:.4g}"),
    ("tflop_per_s", "TFLOP/s", "{:.3g}"),
    ("percent_of_peak", "% peak", "{:.1f}"),
    ("note", "note", "{}"),
)


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table (pastes into the README as it is)."""
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    for row in rows:
        cells = []
        for name, _, fmt in COLUMNS:
            value = getattr(row, name)
            cells.append("" if value is None or value == "" else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedups(rows: list[Row]) -> dict[str, float]:
    """The ratios the goals are stated in (images/s of one variant over another)."""
    by_key = {(r.section, r.variant): r.images_per_s for r in rows if r.images_per_s}
    pairs = {
        "cached_vs_encode_every_step": (("train", "our step, cached latents"), ("train", "encode every step")),
        "our_lora_vs_peft": (("lora", "our LoRA"), ("lora", "peft LoRA")),
        "cuda_graph_vs_eager": (("cuda", "cuda graph"), ("cuda", "eager")),
        "torch_compile_vs_eager": (("cuda", "torch.compile"), ("cuda", "eager")),
    }
    return {name: by_key[a] / by_key[b] for name, (a, b) in pairs.items() if a in by_key and b in by_key}


def machine_info(device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    cpu_model = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
    if cpu_model:
        info["cpu"] = cpu_model.group(1).strip()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run the chosen sections in the order of SECTIONS; returns {"machine", "config", "rows", "speedups"}."""
    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device_dtype(cfg)
    configure_cuda(device, cfg.tf32)
    ctx = Context(cfg, device, dtype)
    rows: list[Row] = []
    for name in SECTIONS:
        if name not in cfg.section_list:
            continue
        if name == "cuda" and device.type != "cuda":
            rows.append(Row("cuda", "skipped", note="CUDA graph / torch.compile comparison needs --device cuda"))
            continue
        started = time.perf_counter()
        new_rows = SECTION_FUNCTIONS[name](ctx)
        rows.extend(new_rows)
        log(f"[bench] {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {
        "machine": machine_info(device),
        "config": config,
        "dtype": str(dtype).replace("torch.", ""),
        "rows": [asdict(r) for r in rows],
        "speedups": speedups(rows),
        "flops": ctx.flops,
        "ops": ctx.ops,
    }


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchConfig, argv)
    result = run_bench(cfg)
    rows = [Row(**r) for r in result["rows"]]
    print(f"machine: {json.dumps(result['machine'])}")
    print(f"arch {cfg.arch}, {cfg.resolution} px, batch {cfg.batch_size}, dtype {result['dtype']}")
    print(format_table(rows))
    for name, value in result["speedups"].items():
        print(f"{name}: {value:.2f}x")
    if cfg.out:
        try:
            atomic_write_bytes(cfg.out, (json.dumps(result, indent=2) + "\n").encode())
        except OSError as error:  # a full disk: no partial file is left, an earlier one is kept
            print(f"error: --out: cannot write {cfg.out} ({error.strerror or error})", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"wrote {cfg.out}")
    return result


if __name__ == "__main__":
    main()
