"""`python -m cxr.lora`: convert a cxr adapter between the kohya and diffusers/peft formats, no model needed.

    python -m cxr.lora convert cxr-lora/lora_unet converted/ --to diffusers   # converted/pytorch_lora_weights...
    python -m cxr.lora convert converted/ my-adapter.safetensors --to kohya
    python -m cxr.lora to-kohya SRC DST    # and to-diffusers SRC DST: the same, the format in the command's name

Rank, alpha and the header's `cxr.*`, `ss_*` and `modelspec.*` entries are kept; the `sshs_*` hashes are computed
for the new file. A diffusers -> kohya -> diffusers round trip gives byte-identical tensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr.fileio import check_writable, check_writable_file
from cxr.model.adapter_files import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, SAVE_DTYPES, read_adapter, write_adapter
from cxr.model.lora import AdapterError

FORMATS = ("kohya", "diffusers")


def convert_adapter(src, dst, to: str, dtype: str = "float32") -> Path:
    """Rewrite an adapter file/folder in format `to`. `dst` is a folder for "diffusers" (gets
    `pytorch_lora_weights.safetensors`) and a file or folder for "kohya" (a folder gets the file named after the
    adapter's `ss_output_name`, else `cxr_lora_kohya.safetensors`)."""
    if to not in FORMATS:
        raise AdapterError(f"unknown adapter format {to!r}; choose diffusers or kohya")
    dst = Path(dst)
    # The output place is checked before the source is read; an existing file that is not .safetensors is never
    # written over or into.
    if dst.suffix != ".safetensors":
        if dst.exists() and not dst.is_dir():
            raise AdapterError(
                f"{dst}: an existing file that is not .safetensors; give a .safetensors file name or a folder"
            )
        check_writable(dst, "dst", AdapterError, create=False)
    else:
        check_writable_file(dst, "dst", AdapterError)
    adapter, _, _, _ = read_adapter(src)
    if to == "diffusers":
        out = dst / DIFFUSERS_WEIGHT_NAME if dst.suffix != ".safetensors" else dst
    else:
        name = adapter.metadata.get("ss_output_name")
        out = dst if dst.suffix == ".safetensors" else dst / (f"{name}.safetensors" if name else KOHYA_WEIGHT_NAME)
        if out.name == DIFFUSERS_WEIGHT_NAME:
            raise AdapterError(f"{out}: a kohya file cannot be named {DIFFUSERS_WEIGHT_NAME}; choose another name")
    check_writable_file(out, "dst", AdapterError)
    return write_adapter(adapter, out, to, {}, SAVE_DTYPES[dtype])


def main(argv: list[str] | None = None, prog: str = "python -m cxr.lora") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Convert cxr LoRA adapters between formats.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (
        ("convert", "adapter -> the format given by --to"),
        ("to-kohya", "diffusers/peft adapter -> kohya file (ComfyUI, A1111/Forge, kohya sd-scripts, diffusers)"),
        ("to-diffusers", "kohya file -> folder with pytorch_lora_weights.safetensors (diffusers, peft)"),
    ):
        cmd = sub.add_parser(command, help=help_text)
        cmd.add_argument("src", help="adapter folder or .safetensors file")
        cmd.add_argument("dst", help="output .safetensors file or folder")
        if command == "convert":
            cmd.add_argument("--to", choices=FORMATS, required=True, help="format of the output")
        cmd.add_argument("--dtype", choices=list(SAVE_DTYPES), default="float32", help="tensor dtype of the output")
    args = parser.parse_args(argv)
    to = args.to if args.command == "convert" else args.command.removeprefix("to-")
    try:
        out = convert_adapter(args.src, args.dst, to, args.dtype)
    except AdapterError as error:
        parser.exit(2, f"error: {error}\n")
    except OSError as error:  # a full disk while writing: the temporary file is removed, the old output kept
        parser.exit(2, f"error: dst: cannot write {error.filename or args.dst} ({error.strerror or error})\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
