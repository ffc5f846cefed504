"""Manual prompt lists (reference §3, paper A.2), user prompt files, encoding and the run cache;
and the generator artifact round trip."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from iipad_cli import prompts as prompts_module
from iipad_cli.errors import IipadError
from iipad_cli.models.prompt_generator import GeneratorConfig, PromptGenerator
from iipad_cli.prompts import builtin_prompts, load_prompt_file, manual_prompt_embeddings, select_prompts
from iipad_cli.schema.generator import load_generator, save_generator


@pytest.mark.parametrize(
    ("layout", "normal", "anomalous"),
    [("mvtec", 154, 2772), ("visa", 154, 858), ("folder", 154, 154)],
)
def test_official_lists_have_the_released_code_sizes(layout, normal, anomalous):
    """22 templates × 7 normal states; × (7 + 68 + 51) MVTec, (7 + 32) VisA, 7 generic states."""
    prompts = builtin_prompts("official", layout)
    assert (len(prompts.normal), len(prompts.anomalous)) == (normal, anomalous)
    assert "a cropped industrial image of the normal object" in prompts.normal
    assert "an industrial image of a object without damage for anomaly detection" in prompts.normal
    assert "a cropped industrial image of the damaged object" in prompts.anomalous


def test_paper_lists_are_appendix_a2():
    mvtec, visa, generic = (builtin_prompts("paper", layout) for layout in ("mvtec", "visa", "other"))
    assert mvtec.normal == (
        "a image of the normal object",
        "a image of the flawless object",
        "a image of the perfect object",
        "a image of the unblemished object",
        "a image of the object without flaw",
        "a image of the object without defect",
        "a image of the object without damage",
    )
    assert len(mvtec.anomalous) == 41 and len(visa.anomalous) == 39 and len(generic.anomalous) == 7
    assert mvtec.anomalous[0] == "a image of the damaged object"
    assert mvtec.anomalous[36] == "a image of the object squeezed with compression"
    assert mvtec.anomalous[-1] == "a image of the object with metal contamination"
    assert visa.anomalous[8] == "a image of the object with foreign particals"
    assert visa.anomalous[-1] == "a image of the object with dirt"
    assert mvtec.source == "builtin:paper:mvtec" and generic.source == "builtin:paper:generic"


def test_prompt_file_json_and_yaml(tmp_path: Path):
    (tmp_path / "p.json").write_text(json.dumps({"normal": ["good part"], "anomalous": ["bad part", "cracked part"]}))
    (tmp_path / "p.yaml").write_text("normal:\n  - good part\nanomalous:\n  - bad part\n  - cracked part\n")
    from_json = load_prompt_file(tmp_path / "p.json")
    from_yaml = select_prompts("official", "mvtec", tmp_path / "p.yaml")
    assert from_json.normal == from_yaml.normal == ("good part",)
    assert from_json.anomalous == from_yaml.anomalous == ("bad part", "cracked part")
    assert from_yaml.source.startswith("file:")


@pytest.mark.parametrize(
    ("text", "message"),
    [("normal: [a]\n", "`anomalous` must be a non-empty list"), ("[1, 2]\n", "expected a mapping"), ("normal: [\n", "not valid")],
)
def test_bad_prompt_file_is_one_line_error(tmp_path: Path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(IipadError, match=message):
        load_prompt_file(path)
    with pytest.raises(IipadError, match="cannot read"):
        load_prompt_file(tmp_path / "missing.yaml")


def test_embeddings_are_clip_encode_text_and_cached(tmp_path: Path, tiny_backbone, monkeypatch):
    prompts = prompts_module.ManualPrompts("test", ("a photo of a good object", "a flawless object"), ("a cracked object",))
    cache = tmp_path / "manual_prompts.safetensors"
    normal, anomalous = manual_prompt_embeddings(tiny_backbone, prompts, cache)
    tokenizer = open_clip.get_tokenizer("ViT-L-14")
    with torch.no_grad():
        expected = tiny_backbone.clip.encode_text(tokenizer(list(prompts.normal)))
    assert torch.allclose(normal, expected, atol=1e-6)
    assert anomalous.shape == (1, 32)
    assert cache.is_file()

    def fail(*args, **kwargs):
        raise AssertionError("re-encoded although the cache matches")

    monkeypatch.setattr(prompts_module, "encode_sentences", fail)
    cached_normal, _ = manual_prompt_embeddings(tiny_backbone, prompts, cache)
    assert torch.equal(cached_normal, normal)
    monkeypatch.undo()
    changed = prompts_module.ManualPrompts("test", prompts.normal, ("a broken object", "a cracked object"))
    _, anomalous = manual_prompt_embeddings(tiny_backbone, changed, cache)
    assert anomalous.shape == (2, 32)


def test_generator_round_trip(tmp_path: Path):
    generator = PromptGenerator(GeneratorConfig(width=32, extra_cls_branch=False)).eval()
    path = tmp_path / "generator.safetensors"
    save_generator(path, generator, {"backbone_id": "tiny", "final_losses": {"total": 1.5}})
    loaded, meta = load_generator(path)
    assert meta["backbone_id"] == "tiny" and meta["final_losses"] == {"total": 1.5}
    assert loaded.config == generator.config and not loaded.training
    z, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert all(torch.equal(a, b) for a, b in zip(generator(z, c), loaded(z, c)))


def test_generator_with_wrong_tensors_is_refused(tmp_path: Path):
    path = tmp_path / "generator.safetensors"
    save_generator(path, PromptGenerator(GeneratorConfig(width=32)), {})
    meta_path = tmp_path / "other.safetensors"
    save_generator(meta_path, PromptGenerator(GeneratorConfig(width=32, extra_cls_branch=False)), {})
    # Swap in a config whose structure differs from the stored tensors.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    with safe_open(str(meta_path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(meta_path), metadata=metadata)
    with pytest.raises(IipadError, match="not a valid generator for its generator_config .has unexpected"):
        load_generator(meta_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(IipadError, match="not a readable safetensors"):
        load_generator(tmp_path / "junk.safetensors")
