"""How a flag is declared, parsed and checked: the machinery behind every command's config dataclass.

`flag()` keeps a field's default, help text, choices, bounds and result/cache role together; from those fields
come the argparse parser (`build_parser`, `parse_config`), the `--config FILE.toml` support (`load_toml`), the
checks every `validate()` starts with (`check_choices`), the saved `config.json` (`save_json`) and one table of
docs/flags.md (`flag_table`). The dataclasses themselves live with their command (cxr/config.py for train.py and
sample.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import typing
from pathlib import Path

from cxr.fileio import atomic_write_bytes


class ConfigError(ValueError):
    """A flag has an invalid value. The message starts with the flag's name."""


def flag(
    default,
    help: str,
    choices: tuple | None = None,
    *,
    result: bool = False,
    cache: bool = False,
    bounds: tuple | None = None,
):
    """A dataclass field with its help text (and allowed values) kept next to the default.

    `bounds=(low, high)`: the sane range of a numeric flag, both ends included, checked by every `validate()` (with
    the other flags, before any work) and shown in --help and docs/flags.md. Every int and float flag has one: a
    huge but finite value (1e20 steps, alpha 1e308) must be a flag error, not an overflow deep in the work.

    `result=True`: the flag changes what training produces (beyond float rounding). A resume with another value
    warns, and the value is recorded in the adapter's header, the manifest and TensorBoard's HParams.
    `cache=True`: it also changes the latent cache's numbers (implies `result`), so it is part of the cache key.
    Those lists are derived from these declarations (`result_flags`, `cache_flags`), never kept by hand.
    """
    metadata = {"help": help, "choices": choices, "result": result or cache, "cache": cache, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def result_flags(cls) -> tuple[str, ...]:
    """Names of the fields declared `result=True` (or `cache=True`), in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("result"))


def cache_flags(cls) -> tuple[str, ...]:
    """Names of the fields declared `cache=True`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("cache"))


def recorded_values(cls, saved: dict, names) -> dict:
    """The values of `names` in a saved config dict (a checkpoint's config, a manifest's `extra`), JSON-style
    (Paths as strings); a flag the record predates (absent from it) had its default value then."""
    defaults = to_dict(cls())
    return {name: saved.get(name, defaults[name]) for name in names}


def changed_result_flags(saved: dict, config) -> list[str]:
    """`--name` of every result flag whose value in `config` differs from the saved config dict's."""
    current = to_dict(config)
    recorded = recorded_values(type(config), saved, result_flags(type(config)))
    return [f"--{name}" for name, value in recorded.items() if value != current[name]]


def _base_type(annotation) -> type:
    """`int`, `float`, `str`, `bool`, `Path` or `list` from an annotation like `int | None`."""
    hint = annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _item_type(annotation) -> type:
    """The element type of a `list[X] | None` annotation (str when unspecified)."""
    hint = annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return (typing.get_args(hint) or (str,))[0]


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(cls, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one `--name` option per dataclass field, plus `--config FILE.toml`."""
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip().splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file setting any of these flags (flat `name = value`); flags given on the command line win",
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default not in ("", None) else "")
        if f.metadata.get("bounds"):
            help_text += f" (range: {range_text(f.metadata['bounds'])})"
        # SUPPRESS: only flags actually given override the TOML file and the dataclass defaults.
        kwargs = dict(help=help_text.replace("%", "%%"), default=argparse.SUPPRESS)
        if kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)  # --flag / --no-flag
        elif kind is list:
            item = _item_type(hints[f.name])
            kwargs.update(nargs="+", type=item, metavar=item.__name__.upper())
        else:
            kwargs.update(type=kind, metavar=kind.__name__.upper())
        if f.metadata.get("choices"):
            kwargs.update(choices=f.metadata["choices"], metavar=None)
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def _coerce(cls, name: str, value, source: str):
    hints = typing.get_type_hints(cls)
    kind = _base_type(hints[name])
    if value is None:
        return None
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if kind is Path:
            return Path(value)
        if kind is list:
            item = _item_type(hints[name])
            return [item(v) for v in (value if isinstance(value, list) else [value])]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind):
            raise TypeError
        return value
    except (TypeError, argparse.ArgumentTypeError):
        raise ConfigError(f"--{name}: {source} gives {value!r}, expected {kind.__name__}") from None


def load_toml(cls, path: Path) -> dict:
    """Read a flat TOML file of flag values; unknown keys are an error (a typo must not be ignored)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config: {path} is not valid TOML: {error}") from None
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"--config: {path} sets unknown flags {unknown}; see --help for the list")
    return {k: _coerce(cls, k, v, f"--config {path}") for k, v in data.items()}


def parse_config(cls, argv: list[str] | None = None, description: str = "", prog: str | None = None):
    """Parse command-line flags (and an optional TOML file) into a validated `cls` instance.

    Invalid values exit with status 2 and a one-line message naming the flag.
    """
    parser = build_parser(cls, description, prog)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    config_file = args.pop("config")
    try:
        values = load_toml(cls, config_file) if config_file else {}
        values.update(args)
        config = cls(**values)
        config.validate()
    except ConfigError as error:
        parser.error(str(error))
    return config


def to_dict(config) -> dict:
    """JSON-ready dict of a config (Paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}


def save_json(config, path: Path, extra: dict | None = None) -> None:
    """Write `config` (every flag) and `extra` to `path` atomically: a failed write keeps the previous file."""
    payload = {"config": to_dict(config), **(extra or {})}
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def flag_table(cls) -> str:
    """A Markdown table of every flag (name, default, help): one table of docs/flags.md."""
    hints = typing.get_type_hints(cls)
    rows = ["| flag | type | default | what it does |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _base_type(hints[f.name]).__name__
        if kind == "list":
            kind = f"{_item_type(hints[f.name]).__name__} [...]"
        choices = f.metadata.get("choices")
        if choices:
            kind = "{" + ",".join(map(str, choices)) + "}"
        if f.metadata.get("bounds"):
            kind += f" in {range_text(f.metadata['bounds'])}"
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        if f.metadata.get("result"):
            help_text += " *(result, cache key)*" if f.metadata.get("cache") else " *(result)*"
        rows.append(f"| `--{f.name}` | {kind} | `{default!r}` | {help_text} |")
    return "\n".join(rows)


def require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"--{name}: {message}")


def check_finite(config) -> None:
    """Every float flag is a finite number: `inf` and `nan` parse as floats but no flag means them."""
    import math

    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if _base_type(hints[f.name]) is float and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name}: must be a finite number, got {value}")


def range_text(bounds: tuple) -> str:
    """`[low, high]` of a flag's bounds, as --help, docs/flags.md and the error messages write it."""
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in bounds) + "]"


def check_choices(config) -> None:
    """Choices and bounds of every flag that has them, and finite float flags (every validate() starts here)."""
    check_finite(config)
    for f in dataclasses.fields(config):
        choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ConfigError(f"--{f.name}: {value!r} is not one of {list(choices)}")
        if bounds and value is not None and not bounds[0] <= value <= bounds[1]:
            raise ConfigError(f"--{f.name}: must be in {range_text(bounds)}, got {value}")
