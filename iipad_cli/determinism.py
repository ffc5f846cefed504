"""Machine-independent CPU arithmetic for `iipad demo`.

Why: the demo's numbers used to differ between machines (README 93.1 / 96.9 / 92.3 / 78.6 against
95.8 / 97.7 / 91.9 / 77.9 elsewhere). Measured (docs/performance.md, "Demo numbers"): the thread
count changes nothing, but the CPU's instruction set does: torch picks AVX-512, AVX2 or baseline
kernels (ATen's own, MKL's matrix products, oneDNN's convolutions) by what the processor offers;
their different rounding flips a few fp16 features by one unit in the last place, and the
official preset's training (Adam, learning rate rising to 0.05) amplifies that into generator
weights differing by up to 0.3, which moves the prompt terms of the image score.

The demo therefore pins the CPU code paths that every x86-64 processor runs identically: ATen's
baseline kernels, MKL's conditional-numerical-reproducibility mode and oneDNN's SSE4.1 kernels, on
one thread. Each library reads its setting once, when it first computes, so this must run before
the process's first tensor operation; `pin_cpu_kernels` reports whether it took effect.
"""

from __future__ import annotations

import os

PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "DNNL_MAX_CPU_ISA": "SSE41"}


def pin_cpu_kernels() -> bool:
    """Select the machine-independent CPU kernels and one thread; True when ATen took the setting
    (False when tensor operations already ran in this process with the machine's own kernels)."""
    os.environ.update(PINNED_KERNELS)
    import torch

    torch.set_num_threads(1)
    return torch.backends.cpu.get_cpu_capability() == "DEFAULT"
