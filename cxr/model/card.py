"""The model card: `README.md` beside the adapter, in the Hugging Face model-card format.

YAML front matter (`base_model` for a hub base model, `library_name`, `tags`, the terms as `license: other` with a
`license_name`), then Markdown: what the adapter is, how to load it in diffusers, ComfyUI, A1111/Forge, kohya
sd-scripts and cxr, the training settings, the training data as counts per source (no paths, no patient IDs), the
held-out split, intended use and limits, the data's terms, and where the memorization audit and release report
are. Written by train.py at every adapter export (`cxr.model.export`), so it always describes the adapter beside it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cxr import __version__
from cxr.fileio import atomic_write_bytes
from cxr.model.provenance import BaseModel

CARD_NAME = "README.md"
# Files beside the adapter that the card links when they are there (put the release report there to share it).
REPORT_NAMES = ("report.html", "release_report.html")
AUDIT_NAMES = ("audit/report.json", "audit_report.json")
TAGS = (
    "stable-diffusion",
    "stable-diffusion-diffusers",
    "text-to-image",
    "lora",
    "diffusers",
    "medical-imaging",
    "chest-x-ray",
    "synthetic-data",
    "cxr",
)
SOURCE_NAMES = {
    "nih": "NIH ChestX-ray14",
    "chexpert": "CheXpert",
    "mimic": "MIMIC-CXR-JPG (PhysioNet)",
    "vindr": "VinDr-CXR (PhysioNet)",
    None: "not recorded",
}
# What each source's agreement asks of a model trained on it (docs/datasets.md; the agreements themselves bind).
SOURCE_TERMS = {
    "nih": "NIH ChestX-ray14: the NIH states that use is unrestricted; link the original download site, acknowledge "
    "the NIH Clinical Center as the data provider and cite Wang et al., ChestX-ray8, CVPR 2017.",
    "chexpert": "CheXpert: the Stanford University School of Medicine CheXpert Dataset Research Use Agreement "
    "allows non-commercial research use only and forbids redistributing the images; check that it allows sharing "
    "this adapter before you do, and cite Irvin et al., AAAI 2019.",
    "mimic": "MIMIC-CXR-JPG: the PhysioNet Credentialed Health Data License and Use Agreement apply to the data and "
    "to anything derived from it, this adapter included. Do not publish it openly (for example on the Hugging Face "
    "Hub); share it only with credentialed users who signed the agreement, for example through PhysioNet. Do not "
    "try to re-identify anyone. Cite Johnson et al. (MIMIC-CXR-JPG, PhysioNet) and PhysioNet.",
    "vindr": "VinDr-CXR: the PhysioNet credentialed license and Data Use Agreement apply as for MIMIC-CXR: this "
    "adapter is derived data; do not publish it openly, share it only with credentialed users, use it for research "
    "and education only, and cite Nguyen et al., VinDr-CXR, Scientific Data 2022, and PhysioNet.",
    None: "The source of some training images was not recorded (a --dataset_dir, or a file list without a "
    "`source` column): the terms of that data apply to this adapter. Find them out and state them here before "
    "sharing it.",
}
PHYSIONET_SOURCES = ("mimic", "vindr")


@dataclass
class CardFacts:
    """What the card states, all of it shareable: names, counts and settings, never a local path."""

    title: str  # the adapter's name (--output_name)
    files: list[str]  # adapter file names in the folder; the first is the one for every tool
    base: BaseModel
    prompt: str
    resolution: int
    prediction_type: str
    steps: int
    settings: list[tuple[str, str]]  # (setting, value) rows of the training table
    train_sources: Counter  # training images per source (None: not recorded)
    val_sources: Counter
    train_patients: int = 0
    val_patients: int = 0
    split_by: str = "image"
    manifest_sha256: str = ""
    links: dict[str, str] = field(default_factory=dict)  # {"report": "report.html", "audit": ...} beside the card

    @property
    def train_images(self) -> int:
        return sum(self.train_sources.values())

    @property
    def val_images(self) -> int:
        return sum(self.val_sources.values())


def _yaml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar


def front_matter(facts: CardFacts) -> str:
    sources = set(facts.train_sources) | set(facts.val_sources)
    if sources & set(PHYSIONET_SOURCES):
        license_name = "physionet-credentialed-health-data-license-1.5.0"
    elif sources == {"nih"}:
        license_name = "base-model-license-and-nih-chestxray14-terms"
    else:
        license_name = "base-model-license-and-training-data-terms"
    lines = ["---"]
    if facts.base.hub_id:
        lines.append(f"base_model: {_yaml_string(facts.base.hub_id)}")
    else:
        lines.append(f"# base_model: the hub id of the local base model {facts.base.name!r}, if it is one")
    lines += [
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        f"instance_prompt: {_yaml_string(facts.prompt)}",
        "inference: false",
        "license: other",
        f"license_name: {license_name}",
        "tags:",
        *(f"- {tag}" for tag in TAGS),
        "---",
    ]
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows) -> list[str]:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _intro(facts: CardFacts) -> list[str]:
    kohya = facts.files[0]
    return [
        f"# {facts.title}",
        "",
        f"A LoRA adapter for the UNet of Stable Diffusion v1.5, trained with cxr {__version__} on "
        f"{facts.train_images} normal chest X-rays for {facts.steps} steps at "
        f"{facts.resolution}x{facts.resolution} pixels. It makes synthetic frontal chest radiographs from the "
        f"prompt `{facts.prompt}`. **The images it makes are synthetic: they show no real patient and are not for "
        "diagnosis.**",
        "",
        *_table(
            ("file", "format", "loads in"),
            [(f"`{kohya}`", "kohya (LDM key names)", "diffusers, ComfyUI, AUTOMATIC1111/Forge, kohya sd-scripts, cxr")]
            + [
                (f"`{name}`", "diffusers/peft", "diffusers, peft, cxr (not ComfyUI, A1111 or sd-scripts)")
                for name in facts.files[1:]
            ],
        ),
        "",
        f"Base model: {facts.base.describe()}."
        + (
            ""
            if facts.base.hub_id
            else " It was trained from a local folder; the fingerprint is the SHA-256 over the SHA-256 of each file "
            "cxr loads from it (`cxr.model.provenance.folder_fingerprint`), the same wherever the folder lies."
        ),
    ]


def _how_to_load(facts: CardFacts) -> list[str]:
    kohya, size, stem = facts.files[0], facts.resolution, facts.title
    scheduler = []
    if facts.prediction_type == "v_prediction":
        scheduler = [
            "from diffusers import DPMSolverMultistepScheduler",
            "",
            "# trained with v-prediction: the scheduler must predict v as well",
            "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, "
            'prediction_type="v_prediction")',
        ]
    comfy_v = " Add a *ModelSamplingDiscrete* node set to `v_prediction`." if scheduler else ""
    a1111_v = (
        " They sample with the checkpoint's prediction type and this adapter predicts v: set the checkpoint up for "
        'v-prediction (a `.yaml` config of its name with `parameterization: "v"`).'
        if scheduler
        else ""
    )
    return [
        "## How to load it",
        "",
        "**diffusers** (`load_lora_weights` reads the kohya key names):",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "",
        "pipe = StableDiffusionPipeline.from_pretrained(",
        f"    {facts.base.hub_id or 'path/to/the/base/model'!r}, torch_dtype=torch.float16",
        ').to("cuda")',
        f'pipe.load_lora_weights("path/to/this/folder", weight_name="{kohya}")',
        *scheduler,
        f'image = pipe("{facts.prompt}", height={size}, width={size}, guidance_scale=3.0).images[0]',
        "```",
        "",
        f"**ComfyUI**: copy `{kohya}` into `ComfyUI/models/loras/` and load it with a *LoraLoader* node after an SD "
        f"v1.5 checkpoint (the adapter changes the UNet only: `strength_clip` does nothing).{comfy_v}",
        "",
        f"**AUTOMATIC1111 / Forge**: copy `{kohya}` into `models/Lora/` and add `<lora:{stem}:1>` to the prompt of an "
        f"SD v1.5 checkpoint; generate at {size}x{size}.{a1111_v}",
        "",
        f"**kohya sd-scripts**: `--network_module networks.lora --network_weights {kohya}` (`gen_img.py`, or "
        "`train_network.py` to train on from it).",
        "",
        "**cxr**: `python sample.py --lora_path path/to/this/folder` (prompt, size and prediction type come from "
        "the adapter's header; every image records its seed and settings).",
    ]


def _data(facts: CardFacts) -> list[str]:
    sources = sorted(set(facts.train_sources) | set(facts.val_sources), key=lambda s: (s is None, s or ""))
    rows = [(SOURCE_NAMES.get(s, str(s)), facts.train_sources.get(s, 0), facts.val_sources.get(s, 0)) for s in sources]
    rows.append(("all", facts.train_images, facts.val_images))
    patients = (
        f" from {facts.train_patients} patients ({facts.val_patients} more patients held out; no patient is on "
        "both sides)"
        if facts.split_by == "patient"
        else " (split by image: no patient IDs were given)"
    )
    return [
        "## Training data",
        "",
        f"{facts.train_images} training images{patients}. {facts.val_images} held-out images were never trained on: "
        "they measure the held-out loss and calibrate the memorization audit.",
        "",
        *_table(("source", "training images", "held-out images"), rows),
        "",
        "Normal frontal chest X-rays. This card and the adapter hold no file paths and no patient IDs; the run's "
        f"`manifest.json` lists every image by content hash (manifest sha256 `{facts.manifest_sha256}`, also in the "
        "adapter's header as `cxr.manifest_sha256`) and stays with the data.",
    ]


def _use_and_limits() -> list[str]:
    return [
        "## Intended use and limits",
        "",
        "- For research and teaching: synthetic normal chest X-rays for method development, data augmentation "
        "experiments and demonstrations.",
        "- **Not for diagnosis or any clinical decision.** Synthetic images show no real patient; do not present them "
        "as real or use them as evidence about anyone.",
        "- Trained on normal images only: it has not learned pathology, and its images are not a fair sample of any "
        "population. The labels of public datasets are mined from reports and noisy.",
        "- A generative model can reproduce training images. Check samples with the memorization audit before "
        "sharing them, and treat the samples of an adapter trained on restricted data as restricted until the audit "
        "and your own review say otherwise.",
        "- The base model's license applies as well (CreativeML OpenRAIL-M for Stable Diffusion v1.5, with its use "
        "restrictions).",
    ]


def _terms(facts: CardFacts) -> list[str]:
    sources = sorted(set(facts.train_sources) | set(facts.val_sources), key=lambda s: (s is None, s or ""))
    lines = ["## Terms of the training data", ""]
    lines += [f"- {SOURCE_TERMS.get(s, SOURCE_TERMS[None])}" for s in sources]
    return lines + ["", "These summarize the agreements accepted when the data was downloaded; those agreements bind."]


def _audit(facts: CardFacts) -> list[str]:
    lines = ["## Memorization audit and release report", ""]
    if facts.links:
        lines += [f"- {what}: [{target}]({target})" for what, target in sorted(facts.links.items())]
        return lines
    return lines + [
        "None was beside the adapter when this card was written. Before sharing the adapter or its samples, run "
        "`python -m cxr.audit` on a set of samples and `python -m cxr.report`, put the report (`report.html`) in "
        "this folder and link it here (train.py links a `report.html` it finds here when it writes this card).",
    ]


def _settings(facts: CardFacts) -> list[str]:
    return ["## Training settings", "", *_table(("setting", "value"), facts.settings)]


def model_card(facts: CardFacts) -> str:
    """The README.md text: front matter, then the sections."""
    parts = [
        front_matter(facts),
        "",
        *_intro(facts),
        "",
        *_how_to_load(facts),
        "",
        *_settings(facts),
        "",
        *_data(facts),
        "",
        *_use_and_limits(),
        "",
        *_terms(facts),
        "",
        *_audit(facts),
    ]
    return "\n".join(parts) + "\n"


def existing_links(folder: Path) -> dict[str, str]:
    """{"release report": name, "memorization audit": name} for the report and audit files beside the adapter."""
    links = {}
    for what, names in (("release report", REPORT_NAMES), ("memorization audit", AUDIT_NAMES)):
        found = next((name for name in names if (Path(folder) / name).is_file()), None)
        if found:
            links[what] = found
    return links


def write_model_card(folder, facts: CardFacts) -> Path:
    """Write `folder/README.md` (atomically) and return its path."""
    path = Path(folder) / CARD_NAME
    atomic_write_bytes(path, model_card(facts).encode("utf-8"))
    return path
