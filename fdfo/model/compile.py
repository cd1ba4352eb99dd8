"""Regional compilation: torch.compile each transformer block, so one compiled block serves all 24.

Blocks of one kind share their compiled code (their weights are graph inputs), so compiling costs
about as much as for one block of each kind (dual-attention, plain, last) and grad mode. Shapes stay
static: sampling always runs batches of one size, training micro-batches of another.
"""

from __future__ import annotations

import torch

from fdfo.config import CompileMode

# Guard sets per block code: {3 block kinds} × {sampling, training} × {LoRA on, off (KL term)}, with room.
RECOMPILE_LIMIT = 32


def should_compile(mode: CompileMode, device: torch.device) -> bool:
    return mode == "always" or (mode == "auto" and device.type == "cuda")


def compile_blocks(transformer: torch.nn.Module) -> int:
    """Compile every block of an SD3 transformer in place (module names, weights and LoRA untouched)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = transformer.transformer_blocks
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)
