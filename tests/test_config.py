"""Flags: one dataclass per command drives the parser, the TOML file, validation and docs/flags.md.
Also: every link between README.md and docs/*.md resolves."""

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
