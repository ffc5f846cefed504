"""Analytic FLOP counts (tests/bench/flops.py) against independent numbers.

ViT-L/14: the GFLOP figures written out in reference-implementation.md §8 and backbones.md, which
were derived separately; they are quoted to 3-4 significant digits, so the tolerance is 1 % for a
single component and 2 % for sums whose quoted parts were rounded. `tiny`: exact multiply-add
counts from an explicit list of every matmul's (rows, inner, cols) shape, enumerated here.
"""

from __future__ import annotations

import pytest

from bench import flops
from iipad_cli.config import BackboneSpec
from iipad_cli.models.registry import get_spec

COMPONENT_REL = 0.01
SUM_REL = 0.02


@pytest.fixture(scope="module")
def vit_l() -> BackboneSpec:
    return get_spec("vit-l-14")


@pytest.fixture(scope="module")
def tiny() -> BackboneSpec:
    return get_spec("tiny")


def test_plain_vit_l_blocks_and_patch_embed(vit_l: BackboneSpec) -> None:
    parts = flops.vv_clip_macs(vit_l)
    assert flops.gflop(parts["blocks"]) == pytest.approx(161.7, rel=COMPONENT_REL)
    assert flops.gflop(parts["patch_embed"]) == pytest.approx(0.3, rel=0.05)


def test_dual_path_extra_vit_l(vit_l: BackboneSpec) -> None:
    assert flops.gflop(flops.vv_clip_macs(vit_l)["dual_path_extra"]) == pytest.approx(15.4, rel=COMPONENT_REL)


def test_vv_clip_total_vit_l(vit_l: BackboneSpec) -> None:
    # §8: "≈ 177" for the V-V CLIP pass (it leaves out the 4 V-V ln_post·proj matmuls, 1.6 GF).
    total = flops.gflop(sum(flops.vv_clip_macs(vit_l).values()))
    assert total == pytest.approx(177.0 + 4 * 256 * 1024 * 768 * 2 / 1e9, rel=SUM_REL)


def test_blip_vision_tower_vit_l(vit_l: BackboneSpec) -> None:
    assert flops.gflop(flops.qformer_vision_macs(vit_l.qformer)) == pytest.approx(155.0, rel=COMPONENT_REL)


def test_qformer_bert_batch_1_and_10(vit_l: BackboneSpec) -> None:
    # "≈ 14" is quoted to two digits (±0.5), hence 4 %.
    assert flops.gflop(flops.qformer_bert_macs(vit_l.qformer, 257, batch=1)) == pytest.approx(14.0, rel=0.04)
    assert flops.gflop(flops.qformer_bert_macs(vit_l.qformer, 257, batch=10)) == pytest.approx(50.0, rel=SUM_REL)


def test_text_pass_full_context_vit_l(vit_l: BackboneSpec) -> None:
    assert flops.gflop(flops.text_macs(vit_l, 77).forward) == pytest.approx(13.3, rel=COMPONENT_REL)


def test_truncated_text_is_about_2_5x_cheaper(vit_l: BackboneSpec) -> None:
    # design.md §4: 30 positions instead of 77 is "2.5× cheaper".
    ratio = flops.text_macs(vit_l, 77).forward / flops.text_macs(vit_l, flops.truncated_length()).forward
    assert flops.truncated_length() == 30
    assert ratio == pytest.approx(2.5, rel=0.05)


def test_knn_cost_per_retrieved_image(vit_l: BackboneSpec) -> None:
    # §8: "kNN vs k·256 bank patches at 2 layers (0.27·k GF)".
    for k in (1, 2, 4):
        knn = flops.score_extra_macs(vit_l, bank_size=15 * k, top_k=k)["knn"]
        assert flops.gflop(knn) == pytest.approx(0.27 * k, rel=COMPONENT_REL)


def test_released_per_image_total_vit_l(vit_l: BackboneSpec) -> None:
    # §8: ≈ 409 GFLOP per test image as coded (dropping our 1.6 GF of V-V projections).
    per_image = flops.released_encoders_macs(vit_l) + sum(flops.score_image_macs(vit_l, 77, 15, 1).values())
    assert flops.gflop(per_image) - 1.6 == pytest.approx(409.0, rel=SUM_REL)


def test_released_mvtec_one_shot_protocol(vit_l: BackboneSpec) -> None:
    # §8: 20 epochs ≈ 35.1 k image pipelines ≈ 14.4 PFLOP.
    total = sum(flops.released_protocol_macs(vit_l).values())
    assert flops.gflop(total) / 1e6 == pytest.approx(14.4, rel=SUM_REL)


def test_iipad_protocol_is_over_ten_times_cheaper(vit_l: BackboneSpec) -> None:
    iipad = sum(flops.iipad_protocol_macs(vit_l).values())
    released = sum(flops.released_protocol_macs(vit_l).values())
    assert released / iipad > 10.0


def _sum_shapes(shapes: list[tuple[int, int, int]]) -> int:
    return sum(rows * inner * cols for rows, inner, cols in shapes)


def test_tiny_vv_clip_hand_count(tiny: BackboneSpec) -> None:
    n, p, d, e, mlp = 257, 256, 64, 32, 256
    shapes = [(p, 3 * 14 * 14, d)]  # patch conv
    for layer in range(1, 6):
        shapes += [(n, d, 3 * d), (n, d, d), (n, d, mlp), (n, mlp, d)]  # qkv, out-proj, MLP
        shapes += [(n, d, n), (n, n, d)]  # q·kᵀ and attn·v summed over heads
        if layer >= 2:  # dual-path blocks 2..5: v·vᵀ, attn·v, second out-proj
            shapes += [(n, d, n), (n, n, d), (n, d, d)]
    shapes += [(p, d, e)] * 4  # V-V layers 2,3,4,5: ln_post · proj
    shapes += [(1, d, e)] * 2  # CLS · proj, without and with ln_post
    assert sum(flops.vv_clip_macs(tiny).values()) == _sum_shapes(shapes)
    assert _sum_shapes(shapes) == 155_194_496


def test_tiny_qformer_hand_count(tiny: BackboneSpec) -> None:
    tokens, queries, image, h, inter, dv = 19, 16, 257, 32, 64, 64
    layer = [
        (tokens, h, 3 * h), (tokens, h, h), (tokens, h, tokens), (tokens, tokens, h),  # self-attention
        (queries, h, h), (image, dv, 2 * h), (queries, h, image), (queries, image, h), (queries, h, h),  # cross
        (tokens, h, inter), (tokens, inter, h),  # query + text FFNs
    ]
    projection = [(queries, h, inter), (queries, inter, h)]
    assert flops.qformer_bert_macs(tiny.qformer, image) == 2 * _sum_shapes(layer) + _sum_shapes(projection)
    tower = [(256, 3 * 14 * 14, dv)] + 4 * [(image, dv, 3 * dv), (image, dv, dv), (image, dv, 256), (image, 256, dv), (image, dv, image), (image, image, dv)]
    assert flops.qformer_vision_macs(tiny.qformer) == _sum_shapes(tower)


def test_tiny_text_and_backward(tiny: BackboneSpec) -> None:
    length, w = 30, 32
    linear = 2 * _sum_shapes([(length, w, 3 * w), (length, w, w), (length, w, 4 * w), (length, 4 * w, w)]) + w * 32
    attention = 2 * _sum_shapes([(length, w, length), (length, length, w)])
    text = flops.text_macs(tiny, length)
    assert (text.linear, text.attention) == (linear, attention)
    assert text.backward(weight_grads=False) == linear + 2 * attention
    assert text.backward(weight_grads=True) == 2 * linear + 2 * attention


def test_shared_trunk_drops_exactly_the_vision_tower(tiny: BackboneSpec) -> None:
    shared = sum(flops.extract_macs(tiny, share_trunk=True).values())
    own = sum(flops.extract_macs(tiny, share_trunk=False).values())
    assert own - shared == flops.qformer_vision_macs(tiny.qformer)


def test_released_training_text_cost_vit_l(vit_l: BackboneSpec) -> None:
    # §8: "2 text passes with backward through the text encoder (≈ 3 × 26.6 ≈ 80 GF)": the released
    # code computes the text weights' gradients too, so backward = 2 forwards.
    text = flops.train_step_macs(vit_l, 77, text_weight_grads=True)["text"]
    assert flops.gflop(text) == pytest.approx(3 * 26.6, rel=SUM_REL)
