"""An adapter people can share: one file named after the run with the header other tools read, a model card beside
it, and no local path in anything meant to be shared (adapter, card, samples' PNG text and index, release report).

References: PyYAML, huggingface_hub's ModelCard and markdown-it for the card; safetensors' own serialization for
kohya sd-scripts' hash definitions (library/train_util.py: precalculate_safetensors_hashes, addnet_hash_safetensors,
addnet_hash_legacy); sd-scripts' library/sai_model_spec.py for the model-spec values of an SD 1.x LoRA.
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import shutil
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
import torch
from helpers import audit_cfg, train_cfg  # tests/helpers.py
from PIL import Image

from cxr.config import SampleConfig, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RUN_NAME = "chest-lora"
PRIVATE = "home-alice-private"  # a parent folder name that must never reach a shared file


def header_of(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})


def tensor_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return data[8 + int.from_bytes(data[:8], "little") :]


@pytest.fixture(scope="module")
def shared(tiny_model_dir, phantom_dir, tmp_path_factory):
    """A run made from a base model in a temporary folder, its samples (--lora_path the adapter file), an audit and
    a release report: everything a user has before sharing. The finished run is then resumed once (a re-export)."""
    from cxr.model.adapter_files import resolve_adapter_file
    from cxr.privacy.audit import audit
    from cxr.privacy.report import ReportConfig, write_report
    from cxr.sample.sampling import sample_run
    from cxr.train import training

    root = tmp_path_factory.mktemp("shared")
    base = root / PRIVATE / "sd-base"
    shutil.copytree(tiny_model_dir, base)
    run = root / PRIVATE / "runs" / RUN_NAME
    cfg = train_cfg(base, phantom_dir, run, max_train_steps=3, log_every=1, lora_alpha=8.0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert training.run(cfg) == 0
    adapter = resolve_adapter_file(run / "lora_unet")  # the file sample.py picks in the folder
    first_export = adapter.read_bytes()
    with contextlib.redirect_stdout(io.StringIO()):  # a finished run resumed: it only exports again
        assert training.run(dataclasses.replace(cfg, resume_from_checkpoint="latest")) == 0
    samples = root / PRIVATE / "samples"
    sample_run(
        SampleConfig(
            base_model=str(base),
            lora_path=adapter,
            out_dir=samples,
            num_images=2,
            batch_size=2,
            num_inference_steps=2,
            device="cpu",
            contact_sheet=2,
        )
    )
    audit_dir = root / PRIVATE / "audit"
    audit(audit_cfg(run, phantom_dir, samples, audit_dir))
    report = root / PRIVATE / "report.html"
    write_report(ReportConfig(run=run, samples=samples, audit=audit_dir, out=report))
    return {
        "root": root,
        "base": base,
        "run": run,
        "adapter": adapter,
        "first_export": first_export,
        "printed": printed.getvalue(),
        "samples": samples,
        "report": report,
    }


# ----------------------------------------------------------------------------- no local path in shared files

# A `/`-rooted path: a slash that starts a token (after a quote, space, `=`, `(`, `[`, `>`, backtick or comma) and is
# followed by a name. URLs (`https://`) and `a/b` do not match.
ROOTED_PATH = re.compile(r"(?:^|[\s\"'=(\[>`,])(/[^\s/\"'`<>]+(?:/[^\s\"'`<>]*)*)")
DATA_URI = re.compile(r"data:[a-z]+/[a-z+.-]+;base64,[A-Za-z0-9+/=]+")


def shared_texts(shared) -> dict[str, str]:
    """name -> text of everything meant to be shared: adapter headers, card, PNG text chunks, index, report."""
    texts = {}
    folder = shared["run"] / "lora_unet"
    for path in sorted(folder.glob("*.safetensors")):
        texts[path.name] = json.dumps(header_of(path), ensure_ascii=False)
    for path in sorted(folder.glob("*.md")):
        texts[path.name] = path.read_text()
    for path in sorted(shared["samples"].glob("*.png")):
        with Image.open(path) as image:
            texts[path.name] = json.dumps(dict(image.text), ensure_ascii=False)
    for name in ("index.json", "index.csv"):
        texts[name] = (shared["samples"] / name).read_text()
    texts["report.html"] = DATA_URI.sub("data:", shared["report"].read_text())
    texts["report.json"] = shared["report"].with_suffix(".json").read_text()
    return texts


@pytest.mark.slow
def test_shared_outputs_hold_no_local_path(shared):
    texts = shared_texts(shared)
    assert {"README.md", f"{RUN_NAME}.safetensors", "index.json", "report.json"} <= set(texts)
    assert any(name.endswith(".png") for name in texts)
    found = {
        name: sorted(set(ROOTED_PATH.findall(text)))[:5]
        for name, text in texts.items()
        if ROOTED_PATH.search(text) or str(shared["root"]) in text or PRIVATE in text
    }
    assert not found, found
    # The scan can fail: the run-internal files, which may keep full paths, do hold them.
    internal = (shared["run"] / "config.json").read_text()
    assert str(shared["base"]) in internal and ROOTED_PATH.search(internal)


@pytest.mark.slow
def test_the_base_model_is_named_by_folder_name_and_content_fingerprint(shared, tiny_model_dir):
    from cxr.model.provenance import folder_fingerprint

    header = header_of(shared["adapter"])
    assert header["cxr.base_model"] == header["ss_sd_model_name"] == "sd-base"
    # The same weights in another place give the same fingerprint; other weights another.
    assert header["cxr.base_model_sha256"] == folder_fingerprint(shared["base"]) == folder_fingerprint(tiny_model_dir)
    index = json.loads((shared["samples"] / "index.json").read_text())
    assert index["settings"]["base_model"] == "sd-base"
    assert index["settings"]["base_model_sha256"] == header["cxr.base_model_sha256"]
    changed = shared["root"] / "changed"
    shutil.copytree(tiny_model_dir, changed)
    config = changed / "unet" / "config.json"
    config.write_text(config.read_text().replace("{", '{"x": 1, ', 1))
    assert folder_fingerprint(changed) != folder_fingerprint(tiny_model_dir)


# ---------------------------------------------------------------------- one file, its header, the end of train.py


@pytest.mark.slow
def test_the_default_export_is_one_file_named_after_the_run_with_its_card(shared):
    assert sorted(p.name for p in (shared["run"] / "lora_unet").iterdir()) == ["README.md", f"{RUN_NAME}.safetensors"]
    assert shared["adapter"].name == f"{RUN_NAME}.safetensors"
    printed = shared["printed"]
    assert f"adapter:     {shared['adapter']}" in printed
    assert f"model card:  {shared['run'] / 'lora_unet' / 'README.md'}" in printed
    for tool in ("diffusers:", "ComfyUI:", "A1111 / Forge:", "kohya sd-scripts:", "cxr:"):
        assert [line for line in printed.splitlines() if line.strip().startswith(tool)], tool
    assert f'weight_name="{RUN_NAME}.safetensors"' in printed and f"<lora:{RUN_NAME}:1>" in printed


@pytest.mark.slow
def test_re_exporting_the_same_weights_gives_the_same_file(shared):
    assert shared["adapter"].read_bytes() == shared["first_export"]


@pytest.mark.slow
def test_the_header_has_what_sd_scripts_writes_and_the_model_spec(shared):
    header = header_of(shared["adapter"])
    assert {k: header[k] for k in ("ss_output_name", "ss_resolution", "ss_num_train_images", "ss_steps")} == {
        "ss_output_name": RUN_NAME,
        "ss_resolution": "(64, 64)",  # sd-scripts writes str() of its (width, height) tuple
        "ss_num_train_images": "20",  # 24 phantoms, 4 held out
        "ss_steps": "3",
    }
    assert (header["ss_network_module"], header["ss_network_dim"], header["ss_network_alpha"]) == (
        "networks.lora",
        "4",
        "8.0",
    )
    assert header["ss_base_model_version"] == "sd_v1" and header["ss_v2"] == "False"
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": RUN_NAME,
        "modelspec.resolution": "64x64",
        "modelspec.prediction_type": "epsilon",
    }
    assert {k: header.get(k) for k in spec} == spec
    assert datetime.fromisoformat(header["modelspec.date"]).year >= 2024
    # What A1111 computes for a LoRA itself (sha256 of the bytes after the header) is what the header says.
    assert header["sshs_model_hash"] == hashlib.sha256(tensor_bytes(shared["adapter"])).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{8}", header["sshs_legacy_hash"])
    assert header["cxr.steps"] == "3" and header["cxr.prompt"] == "chest x-ray, normal"


def test_sshs_hashes_follow_sd_scripts_definitions(tmp_path):
    """Over safetensors' own file of the tensors and the `ss_*` keys: sha256 after the header, and the first 8 hex of
    sha256 of the 64 KiB at 1 MiB (an adapter over 1.1 MiB, so that window holds tensor bytes)."""
    from safetensors.torch import save

    from cxr.model.adapter_files import Adapter, kohya_tensors, write_adapter

    generator = torch.Generator().manual_seed(0)
    paths = [f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{p}" for p in ("to_q", "to_k")]
    pairs = {p: (torch.randn(64, 1280, generator=generator), torch.randn(1280, 64, generator=generator)) for p in paths}
    adapter = Adapter(tensors=pairs, rank=64, alpha=32.0)
    extra = {"ss_output_name": "x", "ss_resolution": "(256, 256)", "modelspec.title": "x", "steps": "5"}
    path = write_adapter(adapter, tmp_path / "x.safetensors", "kohya", extra, torch.float32)
    header = header_of(path)
    tensors, _ = kohya_tensors(adapter)
    reference = save(tensors, metadata={k: v for k, v in header.items() if k.startswith("ss_")})
    assert len(reference) > 0x110000
    length = int.from_bytes(reference[:8], "little")
    assert header["sshs_model_hash"] == hashlib.sha256(reference[8 + length :]).hexdigest()
    assert header["sshs_legacy_hash"] == hashlib.sha256(reference[0x100000:0x110000]).hexdigest()[:8]
    assert header["sshs_model_hash"] == hashlib.sha256(tensor_bytes(path)).hexdigest()
    # Metadata outside `ss_*` does not change them: they describe the weights and the training keys.
    other = write_adapter(adapter, tmp_path / "y.safetensors", "kohya", {**extra, "steps": "6"}, torch.float32)
    assert {k: header_of(other)[k] for k in ("sshs_model_hash", "sshs_legacy_hash")} == {
        k: header[k] for k in ("sshs_model_hash", "sshs_legacy_hash")
    }


# ----------------------------------------------------------------------------- the model card


def split_card(text: str) -> tuple[dict, str]:
    import yaml

    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def rendered(body: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").render(body)


@pytest.mark.slow
def test_the_card_parses_and_states_the_counts_of_the_run(shared):
    from huggingface_hub import ModelCard

    text = (shared["run"] / "lora_unet" / "README.md").read_text()
    front, body = split_card(text)
    assert front["library_name"] == "diffusers" and "lora" in front["tags"] and front["license"] == "other"
    assert "base_model" not in front  # a local base model has no hub id: the card names the folder in its text
    assert "sd-base" in body and front["instance_prompt"] == "chest x-ray, normal"
    card = ModelCard(text)  # the hub's own parser
    assert card.data.library_name == "diffusers" and card.data.license == "other"
    html = rendered(body)
    headings = re.findall(r"<h2>(.*?)</h2>", html)
    assert headings == [
        "How to load it",
        "Training settings",
        "Training data",
        "Intended use and limits",
        "Terms of the training data",
        "Memorization audit and release report",
    ]
    assert html.count("<table>") == 3
    assert "20 training images" in body and "4 held-out images" in body
    assert "| all | 20 | 4 |" in body and "| not recorded | 20 | 4 |" in body
    assert "not for diagnosis" in body.lower()
    assert f'weight_name="{RUN_NAME}.safetensors"' in body and f"<lora:{RUN_NAME}:1>" in body
    assert "ComfyUI/models/loras/" in body and "--network_weights" in body
    assert "| steps | 3 of 3 |" in body


def test_card_of_a_physionet_derived_adapter_states_the_terms():
    from cxr.model.card import CardFacts, model_card
    from cxr.model.provenance import BaseModel

    facts = CardFacts(
        title="mimic-run",
        files=["mimic-run.safetensors", "pytorch_lora_weights.safetensors"],
        base=BaseModel("stable-diffusion-v1-5/stable-diffusion-v1-5"),
        prompt="chest x-ray, normal",
        resolution=256,
        prediction_type="v_prediction",
        steps=2000,
        settings=[("steps", "2000 of 2000")],
        train_sources=Counter({"mimic": 300, "nih": 100}),
        val_sources=Counter({"mimic": 6, "nih": 2}),
        train_patients=250,
        val_patients=7,
        split_by="patient",
        manifest_sha256="ab" * 32,
        links={"release report": "report.html"},
    )
    front, body = split_card(model_card(facts))
    assert front["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert front["license_name"] == "physionet-credentialed-health-data-license-1.5.0"
    assert "| MIMIC-CXR-JPG (PhysioNet) | 300 | 6 |" in body and "| NIH ChestX-ray14 | 100 | 2 |" in body
    assert "| all | 400 | 8 |" in body and "from 250 patients (7 more patients held out" in body
    assert "Do not publish it openly" in body and "ChestX-ray8" in body
    assert 'prediction_type="v_prediction"' in body  # v-prediction: the diffusers snippet sets the scheduler
    assert "[report.html](report.html)" in body
    assert "`pytorch_lora_weights.safetensors` | diffusers/peft" in body
    assert "<h1>mimic-run</h1>" in rendered(body)


# ----------------------------------------------------------------------------- naming, re-exports, stale files


def test_output_name_defaults_to_the_output_folder_and_bad_names_exit_2(capsys):
    from cxr.config import parse_config

    assert TrainConfig(dataset_dir=Path("d"), output_dir=Path("runs/My Run (2)")).resolved_output_name == "My_Run__2_"
    assert TrainConfig(dataset_dir=Path("d"), output_name="nih-256").resolved_output_name == "nih-256"
    for bad in ("../x", "x.safetensors", ".hidden", "pytorch_lora_weights"):
        with pytest.raises(SystemExit) as stopped:
            parse_config(TrainConfig, ["--dataset_dir", "d", "--output_name", bad])
        assert stopped.value.code == 2 and "--output_name" in capsys.readouterr().err, bad


@pytest.fixture()
def lora_unet(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    from cxr.model.lora import inject_lora, lora_modules

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    torch.manual_seed(0)
    inject_lora(unet, rank=4, alpha=4.0)
    with torch.no_grad():
        for module in lora_modules(unet).values():
            module.lora_B.normal_(0.0, 0.1)
    return unet


def test_a_re_export_keeps_the_date_and_an_export_removes_earlier_exports_of_the_run(
    lora_unet, tiny_model_dir, tmp_path, monkeypatch
):
    import dataclasses
    import time

    from safetensors.torch import save_file

    from cxr.model import export
    from cxr.model.adapter_files import DIFFUSERS_WEIGHT_NAME

    cfg = TrainConfig(
        dataset_dir=Path("d"), model_id=str(tiny_model_dir), output_dir=tmp_path / "run", lora_rank=4, lora_alpha=4.0
    )
    facts = export.RunFacts(
        step=5, manifest_sha256="00" * 32, prediction_type="epsilon", train_records=[], val_records=[]
    )
    first = export.export_adapter(lora_unet, cfg, facts)
    data = first.files[0].read_bytes()
    time.sleep(1.1)  # modelspec.date has whole seconds
    assert export.export_adapter(lora_unet, cfg, facts).files[0].read_bytes() == data
    with monkeypatch.context() as patch:  # the check can fail: a new date makes other bytes
        patch.setattr(export, "_date_of_same_export", lambda *args: None)
        assert export.export_adapter(lora_unet, cfg, facts).files[0].read_bytes() != data

    folder = tmp_path / "run" / "lora_unet"
    save_file({"x": torch.zeros(1)}, str(folder / "mine.safetensors"))  # not written by cxr: never removed
    # A resume with another name and format: the earlier file of the run goes, the user's own file stays.
    renamed = export.export_adapter(lora_unet, dataclasses.replace(cfg, export_format="both", output_name="v2"), facts)
    assert [p.name for p in renamed.files] == ["v2.safetensors", DIFFUSERS_WEIGHT_NAME]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "mine.safetensors", "v2.safetensors", DIFFUSERS_WEIGHT_NAME]
    )
