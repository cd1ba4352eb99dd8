"""Regional compilation: torch.compile each transformer block, so one compiled block serves all of its kind.

Blocks of one kind share their compiled code (their weights are graph inputs), so compiling costs
about as much as for one block of each kind (SD3.5-M: dual-attention, plain, last; FLUX: double- and
single-stream) and grad mode. Shapes stay
static: sampling always runs batches of one size, training micro-batches of another.
"""

from __future__ import annotations

import torch

from fdfo.config import CompileMode

# Guard sets per block code: {3 block kinds} × {sampling, training} × {LoRA on, off (KL term)}, with room.
RECOMPILE_LIMIT = 32


def should_compile(mode: CompileMode, device: torch.device) -> bool:
    return mode == "always" or (mode == "auto" and device.type == "cuda")


def compile_blocks(blocks: list[torch.nn.Module]) -> int:
    """Compile every block of a transformer (Backbone.blocks) in place (module names, weights and LoRA untouched)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)
