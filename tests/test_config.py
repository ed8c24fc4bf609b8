"""Flags: one dataclass per command drives the parser, the TOML file, validation and docs/flags.md.
Also: every link between README.md and docs/*.md resolves, and every module they name exists."""

import ast
import functools
import re
from pathlib import Path

import pytest

from cxr.config import SampleConfig, TrainConfig, parse_config, update_flag_tables

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_flag_reference_matches_the_config_dataclasses():
    text = (ROOT / "docs" / "flags.md").read_text()
    assert update_flag_tables(text) == text, "run `python -m cxr.config` to regenerate the tables of docs/flags.md"


def test_command_line_overrides_toml_file(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text('dataset_dir = "data"\nlora_rank = 8\nlearning_rate = 3e-4\ncuda_graph = "on"\n')
    config = parse_config(TrainConfig, ["--config", str(config_file), "--lora_rank", "4"])
    assert config.lora_rank == 4
    assert config.learning_rate == 3e-4
    assert config.cuda_graph == "on"
    assert config.dataset_dir == Path("data")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--lora_rank", "0"], "--lora_rank"),
        (["--learning_rate", "-1e-4"], "--learning_rate"),
        (["--train_batch_size", "0"], "--train_batch_size"),
        (["--resolution", "250"], "--resolution"),
        (["--mixed_precision", "fp8"], "--mixed_precision"),
        (["--lr_scheduler", "step"], "--lr_scheduler"),
        (["--val_fraction", "1.5"], "--val_fraction"),
    ],
)
def test_invalid_train_flags_exit_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--dataset_dir", "data", *argv])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_unknown_toml_key_is_an_error(tmp_path, capsys):
    config_file = tmp_path / "run.toml"
    config_file.write_text("lora_rnak = 8\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--dataset_dir", "d", "--config", str(config_file)])
    assert "lora_rnak" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--bit_depth", "12"], "--bit_depth"),
        (["--height", "100"], "--height"),
        (["--num_images", "0"], "--num_images"),
    ],
)
def test_invalid_sample_flags_exit_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        parse_config(SampleConfig, argv)
    assert flag in capsys.readouterr().err


def _prose_lines(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, in_code = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def _github_anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens; a repeated heading gets -1, -2."""
    anchors = set()
    for line in _prose_lines(path):
        if match := re.match(r"#{1,6} (.+)$", line):
            anchor = base = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            repeat = 0
            while anchor in anchors:
                repeat += 1
                anchor = f"{base}-{repeat}"
            anchors.add(anchor)
    return anchors


def test_links_in_readme_and_docs_point_at_files_and_headings():
    """Every relative link of README.md and docs/*.md names a file that exists and, after #, a heading in it."""
    broken, checked = [], 0
    for doc in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", "\n".join(_prose_lines(doc))):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (doc.parent / file_part).resolve() if file_part else doc
            checked += 1
            if not linked.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _github_anchors(linked):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 30
    assert broken == []


def _adapter_header_keys() -> set[str]:
    """The `cxr.` keys of an exported adapter's header: docs name them in the same dotted form as modules."""
    from cxr.model.export import adapter_metadata
    from cxr.model.provenance import BaseModel

    keys = adapter_metadata(TrainConfig(), 1, "0" * 64, "epsilon", BaseModel("base", sha256="0" * 64))
    return {f"cxr.{key}" for key in keys} | {"cxr.rank", "cxr.alpha", "cxr.targets", "cxr.version"}


def _defined_names(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """The names a module or class body binds: functions, classes, assignments, imports."""
    names = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update({name.id: node for name in ast.walk(target) if isinstance(name, ast.Name)})
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(alias.asname or alias.name).split(".")[0]: node for alias in node.names})
    return names


@functools.cache
def _module_body(source: Path) -> list[ast.stmt]:
    return ast.parse(source.read_text()).body


def _names_something(dotted: str) -> bool:
    """Whether `dotted` is a module of the package, or a name defined in the longest module it starts with (and in a
    class, a name of its body). Read from the source, so that checking the docs imports nothing."""
    parts = dotted.split(".")
    for end in range(len(parts), 1, -1):
        stem = ROOT.joinpath(*parts[:end])
        source = next((path for path in (stem.with_suffix(".py"), stem / "__init__.py") if path.is_file()), None)
        if source is None:
            continue
        body = _module_body(source) if parts[end:] else []
        for attribute in parts[end:]:
            node = _defined_names(body).get(attribute)
            if node is None:
                return False
            body = node.body if isinstance(node, ast.ClassDef) else []
        return True
    return False


def test_every_module_and_function_the_docs_name_exists():
    """`cxr.<module>[.<name>]` in README.md and docs/*.md (prose and code blocks) imports; adapter header keys aside."""
    header_keys, checked, missing = _adapter_header_keys(), set(), []
    for doc in [README, *DOCS]:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for dotted in re.findall(r"\bcxr(?:\.[A-Za-z_]\w*)+", line):
                if dotted in header_keys:
                    continue
                checked.add(dotted)
                if not _names_something(dotted):
                    missing.append(f"{doc.relative_to(ROOT)}:{number}: {dotted}")
    assert len(checked) > 30
    assert missing == []


def test_docs_do_not_send_users_to_the_test_suite_for_code():
    """A user's install has no tests/ folder: the docs may cite a test as evidence, never import from one."""
    importing = re.compile(r"sys\.path\.insert\([^)]*tests|\bfrom test_\w+ import|\bimport test_\w+")
    found = [
        f"{doc.relative_to(ROOT)}:{number}"
        for doc in [README, *DOCS]
        for number, line in enumerate(doc.read_text().splitlines(), 1)
        if importing.search(line)
    ]
    assert found == []


def test_readme_links_every_doc():
    readme = README.read_text()
    assert len(DOCS) > 5
    assert [doc.name for doc in DOCS if f"](docs/{doc.name}" not in readme] == []


def test_decode_workers_default_to_the_cpus_available_up_to_8(monkeypatch):
    import os

    import cxr.config

    assert TrainConfig().resolved_num_workers == min(8, len(os.sched_getaffinity(0)))
    monkeypatch.setattr(cxr.config, "available_cpus", lambda: 32)
    assert TrainConfig().resolved_num_workers == 8
    assert TrainConfig(dataloader_num_workers=0).resolved_num_workers == 0
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--dataset_dir", "d", "--dataloader_num_workers", "-1"])


def test_config_command_help_and_no_argument_write_nothing(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    (tmp_path / "docs").mkdir()
    reference = tmp_path / "docs" / "flags.md"
    reference.write_text("my own notes\n")
    for argv, code in ((["--help"], 0), ([], 2)):
        done = subprocess.run(
            [sys.executable, "-m", "cxr.config", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == code, done.stderr
        assert "Traceback" not in done.stderr
        assert "usage:" in done.stdout + done.stderr
    assert reference.read_text() == "my own notes\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["docs", "flags.md"]


def test_config_command_on_a_file_without_flag_tables_exits_2_unchanged(tmp_path, capsys):
    from cxr.config import main

    notes = tmp_path / "notes.md"
    notes.write_text("my own notes\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(notes)])
    assert exit_info.value.code == 2
    assert "has no <!-- flags:train --> marker" in capsys.readouterr().err
    assert notes.read_text() == "my own notes\n"


def _valid_configs():
    """A valid instance of every command's config (the required flags set), by docs/flags.md block name."""
    from cxr.config import FLAG_TABLES, _config_class

    required = {
        "train": dict(dataset_dir=Path("d")),
        "audit": dict(train_dir=Path("t"), samples_dir=Path("s")),
        "evaluate": dict(real=Path("r"), fake=Path("f")),
        "report": dict(run=Path("r"), samples=Path("s"), audit=Path("a")),
        "dedup": dict(dataset_dir=Path("d")),
    }
    return {name: _config_class(spec)(**required.get(name, {})) for name, spec in FLAG_TABLES.items()}


def _numeric_flags():
    import dataclasses
    import typing

    from cxr.config import _base_type

    for command, config in _valid_configs().items():
        hints = typing.get_type_hints(type(config))
        for f in dataclasses.fields(config):
            if _base_type(hints[f.name]) in (int, float) and not f.metadata.get("choices"):
                yield command, config, f, _base_type(hints[f.name])


def test_every_numeric_flag_declares_a_range_its_default_lies_in():
    for command, config, f, _ in _numeric_flags():
        bounds = f.metadata.get("bounds")
        half_open = f.name in ("intensity_clip_percent", "val_fraction", "lora_dropout", "threshold_quantile")
        assert bounds or half_open or "threshold" in f.name, f"{command} --{f.name} has no bounds"
        value = getattr(config, f.name)
        assert not bounds or value is None or bounds[0] <= value <= bounds[1], (command, f.name)
    for command, config in _valid_configs().items():
        if command != "select":  # no numeric flags; its validate() needs real label files
            config.validate()  # the defaults pass


@pytest.mark.parametrize("sign", [1, -1])
def test_huge_finite_values_of_every_numeric_flag_are_flag_errors(sign):
    import dataclasses

    from cxr.config import ConfigError

    checked = 0
    for _command, config, f, kind in _numeric_flags():
        huge = sign * (10**20 if kind is int else 1e300)
        with pytest.raises(ConfigError, match=rf"^--{f.name}: "):
            dataclasses.replace(config, **{f.name: huge}).validate()
        checked += 1
    assert checked > 80


def test_huge_values_from_the_issue_exit_2_naming_the_flag(capsys):
    from cxr.privacy.audit_config import AuditConfig
    from cxr.privacy.evaluate import EvaluateConfig

    cases = [
        (TrainConfig, ["--dataset_dir", "d", "--encode_batch_size", str(10**20)], "--encode_batch_size"),
        (TrainConfig, ["--dataset_dir", "d", "--lora_alpha", "1e308"], "--lora_alpha"),
        (TrainConfig, ["--dataset_dir", "d", "--snr_gamma", "1e308"], "--snr_gamma"),
        (SampleConfig, ["--num_inference_steps", str(10**20)], "--num_inference_steps"),
        (AuditConfig, ["--train_dir", "t", "--samples_dir", "s", "--resolution", str(10**20)], "--resolution"),
        (EvaluateConfig, ["--real", "r", "--fake", "f", "--msssim_resolution", str(10**20)], "--msssim_resolution"),
        (EvaluateConfig, ["--real", "r", "--fake", "f", "--seed", "-1"], "--seed"),
    ]
    for cls, argv, flag in cases:
        with pytest.raises(SystemExit) as exit_info:
            parse_config(cls, argv)
        assert exit_info.value.code == 2
        assert f"{flag}: must be in [" in capsys.readouterr().err


def test_the_checkpoint_disk_estimate_counts_only_the_checkpoints_the_run_writes():
    from cxr.train.rundir import estimate_disk_bytes

    def output_bytes(**flags):
        return estimate_disk_bytes(TrainConfig(dataset_dir=Path("d"), **flags), 100, 8)["output"]

    three_steps = dict(max_train_steps=3, checkpointing_steps=1)
    assert output_bytes(checkpoints_total_limit=10**6, **three_steps) == output_bytes(
        checkpoints_total_limit=3, **three_steps
    )
    assert output_bytes(checkpoints_total_limit=2, **three_steps) < output_bytes(
        checkpoints_total_limit=3, **three_steps
    )
    assert output_bytes(checkpoints_total_limit=None, **three_steps) == output_bytes(
        checkpoints_total_limit=3, **three_steps
    )
    assert output_bytes(checkpoints_total_limit=10**6, max_train_steps=3, checkpointing_steps=0) == output_bytes(
        checkpoints_total_limit=1, max_train_steps=3, checkpointing_steps=0
    )
