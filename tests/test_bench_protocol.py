"""The released-code mapping used by tests/bench/bench_protocol.py computes the same features as
iipad's encoders (so timing it times the same mathematics), and the protocol prediction adds up
the per-unit costs as the schedules prescribe."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent / "bench" / "bench_protocol.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_protocol", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_protocol"] = module
    spec.loader.exec_module(module)
    return module


def test_released_encoders_equal_iipad_encoders(bench, tiny_backbone) -> None:
    """Own vision tower + 10 broadcast query rows averaged (released) == one trunk-shared pass."""
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        released = bench.released_encoders(tiny_backbone, images)
        iipad = tiny_backbone.encode_images(images, share_trunk=True)
        separate = tiny_backbone.qformer(images)
    assert (released.qformer - separate).abs().max().item() <= 1e-5
    assert (released.qformer - iipad.qformer).abs().max().item() <= 1e-5
    for name in ("cls_token", "vv", "mem"):
        assert torch.equal(getattr(released, name), getattr(iipad, name))


def test_prediction_adds_units_per_schedule(bench) -> None:
    units = {
        "extract_b8_shared": 1.0,
        "train_step_truncated": 0.1,
        "bank_entry_iipad": 0.5,
        "score_image_iipad": 0.01,
        "released_encoders": 2.0,
        "train_step_released": 0.3,
        "bank_entry_released": 0.2,
        "score_image_released": 0.25,
    }
    shape = bench.Shape(classes=3, shots=2, test_images=10, epochs=4)
    predicted = bench.predict(units, shape)
    # iipad: 16 images extracted once, 4 epochs x 6 steps, 6 bank entries once, 10 images scored.
    assert predicted["iipad"]["total"] == pytest.approx(16 * 1.0 + 24 * 0.1 + 6 * 0.5 + 10 * 0.01)
    # released: every epoch 6 steps, 6 bank entries and 10 test images, each re-running encoders.
    assert predicted["released"]["total"] == pytest.approx(4 * (6 * 2.3 + 6 * 2.2 + 10 * 2.25))
