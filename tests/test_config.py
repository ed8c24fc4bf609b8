"""Flags: one dataclass per command drives the parser, the TOML file, validation and the README."""

from pathlib import Path

import pytest

from cxr.config import SampleConfig, TrainConfig, parse_config, update_readme_flag_tables

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_flag_tables_match_the_config_dataclasses():
    text = README.read_text()
    assert update_readme_flag_tables(text) == text, "run `python -m cxr.config README.md` to regenerate the flag tables"


def test_command_line_overrides_toml_file(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text('dataset_dir = "data"\nlora_rank = 8\nlearning_rate = 3e-4\ncuda_graph = true\n')
    config = parse_config(TrainConfig, ["--config", str(config_file), "--lora_rank", "4"])
    assert config.lora_rank == 4
    assert config.learning_rate == 3e-4
    assert config.cuda_graph is True
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


@pytest.mark.parametrize("argv, flag", [(["--bit_depth", "12"], "--bit_depth"), (["--height", "100"], "--height"), (["--num_images", "0"], "--num_images")])
def test_invalid_sample_flags_exit_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        parse_config(SampleConfig, argv)
    assert flag in capsys.readouterr().err


def _github_anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_contents_links_point_at_headings():
    import re

    text, in_code, anchors = README.read_text(), False, set()
    for line in text.splitlines():
        in_code ^= line.startswith("```")
        if not in_code and (match := re.match(r"#{1,6} (.+)$", line)):
            anchors.add(_github_anchor(match.group(1)))
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert len(links) > 30
    assert sorted(links - anchors) == []


def test_decode_workers_default_to_the_cpus_available_up_to_8(monkeypatch):
    import os

    import cxr.config

    assert TrainConfig().resolved_num_workers == min(8, len(os.sched_getaffinity(0)))
    monkeypatch.setattr(cxr.config, "available_cpus", lambda: 32)
    assert TrainConfig().resolved_num_workers == 8
    assert TrainConfig(dataloader_num_workers=0).resolved_num_workers == 0
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--dataset_dir", "d", "--dataloader_num_workers", "-1"])
