"""Manual normal / anomalous prompts for the textual guidance loss (eq. 11).

The lists live in `assets/manual_prompts.json` (provenance in docs/training.md): per template set
(`official` = the released code's 22 "industrial image" templates, `paper` = appendix A.2's
"a image of the ..." phrasing) the normal states and, per data set (`mvtec`, `visa`, `generic`),
the anomalous states. Each state is formatted with "object" and placed in every template.
A user file (`--prompts FILE`, JSON or YAML with `normal` and `anomalous` lists of sentences)
replaces them. The sentences are encoded once with the frozen CLIP text tower and cached in the
run directory, keyed by a hash of the lists and of the backbone weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import open_clip
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from iipad_cli.artifacts import atomic_path, sha256_json
from iipad_cli.errors import IipadError
from iipad_cli.models.backbone import Backbone

# Data-set layouts with their own anomalous state list; anything else gets the generic states.
DATASET_LISTS = ("mvtec", "visa")
GENERIC = "generic"
# The BPE vocabulary of every open_clip OpenAI CLIP model (the `tiny` backbone shares it).
TOKENIZER_MODEL = "ViT-L-14"
ENCODE_BATCH = 128


@dataclass(frozen=True)
class ManualPrompts:
    """The sentences used for t^n and t^a, and where they came from (recorded in the artifacts)."""

    source: str
    normal: tuple[str, ...]
    anomalous: tuple[str, ...]

    def key(self, weights: dict[str, str]) -> str:
        """Cache key: the exact sentences and the text tower's weights."""
        return sha256_json({"normal": self.normal, "anomalous": self.anomalous, "weights": weights})

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "normal_count": len(self.normal),
            "anomalous_count": len(self.anomalous),
            "sha256": sha256_json({"normal": self.normal, "anomalous": self.anomalous}),
        }


def _builtin_lists() -> dict[str, Any]:
    text = resources.files("iipad_cli").joinpath("assets", "manual_prompts.json").read_text()
    return json.loads(text)


def builtin_prompts(template_set: str, layout: str | None) -> ManualPrompts:
    """The built-in sentences of one template set for a data-set layout (`mvtec`, `visa`, other)."""
    data = _builtin_lists()
    if template_set not in data:
        raise IipadError(f"unknown manual prompt template set {template_set!r}")
    entry = data[template_set]
    dataset = layout if layout in DATASET_LISTS else GENERIC
    word = data["object_word"]

    def sentences(states: list[str]) -> tuple[str, ...]:
        # Template-major order, as the released code builds its list.
        return tuple(template.format(state.format(word)) for template in entry["templates"] for state in states)

    return ManualPrompts(
        source=f"builtin:{template_set}:{dataset}",
        normal=sentences(entry["normal"]),
        anomalous=sentences(entry["anomalous"][dataset]),
    )


def load_prompt_file(path: Path) -> ManualPrompts:
    """A user's `normal` / `anomalous` sentence lists from a JSON or YAML file, used as written."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise IipadError(f"{path}: cannot read prompt file ({error.strerror})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise IipadError(f"{path}: not valid JSON/YAML ({first_line})") from None
    if not isinstance(data, dict):
        raise IipadError(f"{path}: expected a mapping with `normal` and `anomalous` lists")
    lists: dict[str, tuple[str, ...]] = {}
    for name in ("normal", "anomalous"):
        value = data.get(name)
        if not isinstance(value, list) or not value or not all(isinstance(s, str) and s.strip() for s in value):
            raise IipadError(f"{path}: `{name}` must be a non-empty list of sentences")
        lists[name] = tuple(value)
    return ManualPrompts(source=f"file:{path.resolve()}", normal=lists["normal"], anomalous=lists["anomalous"])


def select_prompts(template_set: str, layout: str | None, prompts_file: Path | None) -> ManualPrompts:
    return load_prompt_file(prompts_file) if prompts_file is not None else builtin_prompts(template_set, layout)


@torch.no_grad()
def encode_sentences(backbone: Backbone, sentences: tuple[str, ...]) -> Tensor:
    """Raw (un-normalised) CLIP text embeddings (N, embed_dim), fp32: the standard `encode_text`
    (EOT pooling, then text_projection) on tokenised sentences."""
    tokenizer = open_clip.get_tokenizer(TOKENIZER_MODEL)
    device = backbone.device
    chunks = []
    for start in range(0, len(sentences), ENCODE_BATCH):
        tokens = tokenizer(list(sentences[start : start + ENCODE_BATCH])).to(device)
        chunks.append(backbone.clip.encode_text(tokens).float())
    return torch.cat(chunks).cpu()


def manual_prompt_embeddings(backbone: Backbone, prompts: ManualPrompts, cache: Path) -> tuple[Tensor, Tensor]:
    """(normal (Nn, D), anomalous (Na, D)) raw embeddings, from `cache` when its key matches,
    otherwise encoded and written there atomically (with the sentences in its metadata)."""
    key = prompts.key(backbone.weights)
    if cache.is_file():
        try:
            with safe_open(str(cache), framework="pt") as handle:
                if (handle.metadata() or {}).get("key") == key and set(handle.keys()) == {"normal", "anomalous"}:
                    normal, anomalous = handle.get_tensor("normal"), handle.get_tensor("anomalous")
                    width = backbone.spec.embed_dim
                    if (
                        normal.dtype == anomalous.dtype == torch.float32
                        and tuple(normal.shape) == (len(prompts.normal), width)
                        and tuple(anomalous.shape) == (len(prompts.anomalous), width)
                    ):
                        return normal, anomalous
        except (OSError, ValueError, KeyError, SafetensorError):
            pass  # an unreadable cache, or one whose tensors differ from what its key promises, is rebuilt
    normal = encode_sentences(backbone, prompts.normal)
    anomalous = encode_sentences(backbone, prompts.anomalous)
    metadata = {
        "key": key,
        "source": prompts.source,
        "normal": json.dumps(list(prompts.normal)),
        "anomalous": json.dumps(list(prompts.anomalous)),
    }
    with atomic_path(cache) as tmp:
        save_file({"normal": normal.contiguous(), "anomalous": anomalous.contiguous()}, str(tmp), metadata=metadata)
    return normal, anomalous
