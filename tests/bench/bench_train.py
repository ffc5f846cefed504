"""Training throughput (optimizer steps/s, one image per step as the released code).

One step = prompt generator forward, two text-encoder passes (S^n, S^a), all losses of the preset,
backward through the frozen text tower into the generator, Adam step — everything `iipad train`
does per step, on random feature tensors (features are read from disk once per run, not per step).

1. `tiny` backbone sizes (width 32, 4 x 256 V-V tokens), random weights.
2. ViT-L/14 sizes (d = 768, T' = 28, 4 x 256 x 768 V-V tokens, the 8.9 M-parameter generator) with
   the real-size CLIP text tower re-initialised N(0, 0.02) (random weights), once with the
   truncated context (T' + 2 = 30 positions, what `iipad train` runs) and once with the full
   77-token context of the released code (the same result, see tests of models/text.py).

    python tests/bench/bench_train.py --json out.json [--steps 5] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _report import emit_report, machine_info  # noqa: E402

from iipad_cli.config import get_preset  # noqa: E402
from iipad_cli.losses import normalise, prompt_losses  # noqa: E402
from iipad_cli.models.prompt_generator import GeneratorConfig, PromptGenerator  # noqa: E402
from iipad_cli.models.registry import build_clip, get_spec  # noqa: E402
from iipad_cli.models.text import PromptTextEncoder  # noqa: E402

MANUAL_PROMPTS = 64


def _text_encoder(backbone_id: str, device: torch.device) -> PromptTextEncoder:
    """The spec's CLIP text tower with N(0, 0.02) weights and identity LayerNorms (open_clip's
    default init has denormals that slow CPU matmuls, backbones.md)."""
    clip = build_clip(get_spec(backbone_id))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in clip.named_parameters():
            if name.startswith("visual"):
                continue
            if "ln" in name:
                tensor.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                tensor.zero_()
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    del clip.visual
    return PromptTextEncoder(clip).to(device).eval()


def bench_steps(backbone_id: str, context: str, steps: int, device: torch.device, preset_name: str = "official") -> dict[str, Any]:
    spec = get_spec(backbone_id)
    preset = get_preset(preset_name)
    d = spec.text_width
    layers, patches = len(spec.vv_layers), spec.num_patches
    text = _text_encoder(backbone_id, device)
    torch.manual_seed(0)
    generator = PromptGenerator(GeneratorConfig.from_preset(preset, width=d, query_tokens=spec.qformer.num_query_tokens))
    generator = generator.to(device).train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=preset.lr, weight_decay=preset.weight_decay)
    z = torch.randn(1, spec.qformer.num_query_tokens, d, device=device)
    cls = normalise(torch.randn(1, d, device=device))
    vv = torch.randn(1, layers, patches, spec.embed_dim, device=device)
    manual_n = torch.randn(MANUAL_PROMPTS, spec.embed_dim, device=device)
    manual_a = torch.randn(MANUAL_PROMPTS, spec.embed_dim, device=device)

    def step() -> None:
        s_n, s_a = generator(z, cls)
        e_n, p = text(s_n, context=context)
        e_a, n = text(s_a, context=context)
        terms = prompt_losses(
            features=vv,
            noise=torch.randn_like(vv),
            e_normal=normalise(e_n),
            e_abnormal=normalise(e_a),
            normal_tokens=normalise(p),
            abnormal_tokens=normalise(n),
            manual_normal=manual_n,
            manual_abnormal=manual_a,
            preset=preset,
        )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()

    step()  # warm-up (allocator, thread pool)
    if device.type == "cuda":
        torch.cuda.synchronize()
    load = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    return {
        "backbone": backbone_id,
        "context": context,
        "positions": spec.clip_config["text_cfg"]["context_length"] if context == "full" else generator.config.sequence_length + 2,
        "steps": steps,
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 3),
        # CPU seconds per step of this process: less sensitive than wall time to other load.
        "cpu_seconds_per_step": round(cpu_seconds / steps, 4),
        "load_average_1min": round(load, 2),
        "generator_params": sum(p.numel() for p in generator.parameters()),
        "note": "random weights",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per ViT-L/14 configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="2 timed ViT-L/14 steps")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = 2 if args.quick else args.steps
    results: dict[str, Any] = {
        "train_step_tiny": bench_steps("tiny", "truncated", 20 * steps, device),
        "train_step_vit_l_14_truncated": bench_steps("vit-l-14", "truncated", steps, device),
        "train_step_vit_l_14_full": bench_steps("vit-l-14", "full", steps, device),
    }
    truncated = results["train_step_vit_l_14_truncated"]["steps_per_s"]
    results["vit_l_14_truncated_speedup"] = round(truncated / results["train_step_vit_l_14_full"]["steps_per_s"], 2)
    results["machine"] = machine_info(args.device)
    emit_report(results, args.json)


if __name__ == "__main__":
    main()
