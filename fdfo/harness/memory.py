"""`--max-memory-gib`: a run that fits a smaller GPU. The batch sizes as executed (pairs per sampling call, items per
training micro-batch) and activation checkpointing are chosen so that every phase's estimated peak stays within the
budget, the frozen models are parked as soon as they are built (and the transformer's base weights while the text
encoders encode, where both would not fit together), and the allocator is capped at the budget, so that an
estimate that was wrong fails loudly instead of using more. Only speed and float rounding change: the paper's
batch split, every pair's noise and each step's items stay as they are.

The estimate adds the sizes of what each phase holds (weights, stored trajectories, optimiser state) to activation
costs per (transformer block · token · channel), measured on an H200 at SD3.5-M's shapes (512 px, 205 text tokens)
with the fp16 recipe and compiled blocks, so that they carry over to other resolutions and backbones of the same
kind: the training peaks of `bench/profile_step.py` at micro-batches of 6 to 24 (bench/results/profile-step-h200.json)
and the 22-GiB sanity run (docs/performance.md, "A 24 GB profile").
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fdfo import distributed
from fdfo.config import ConfigError, SampleConfig
from fdfo.harness.batching import BatchPlan
from fdfo.model.lora import trainable
from fdfo.model.parking import frozen_tensors, module_bytes, tensor_bytes
from fdfo.model.backbone import Backbone
from fdfo.model.sd3 import SD3

if TYPE_CHECKING:
    from fdfo.harness.learner import Learner

GIB = 2**30
# Activation bytes per (block · token · channel) of one transformer row, and fixed costs (workspaces, the decoder's
# one image, the allocator's rounding), measured as above.
TRAIN_BYTES = 33.8  # kept for the backward pass through a block: the profile's 1.43 GiB per item
CHECKPOINTED_BYTES = 12.5  # kept per block when blocks are recomputed in the backward pass: from the 22-GiB run's
# whole-run peak (20.8 GiB allocated at micro-batch 20), an upper bound if that peak was not in training
SAMPLE_BYTES = 40.0  # live at once in a no-grad block (sampling keeps no block's activations); an upper bound:
# 11.7 GiB measured where this estimates 13.3 (16 pairs per call)
TRAIN_FIXED_GIB = 3.4  # the profile's peak at micro-batch 6 less its activations and weights
SAMPLE_FIXED_GIB = 1.5
# Milliseconds per training item by micro-batch (the profile's), linear in 1 / micro-batch between and below the
# points; recomputing the blocks' forward passes costs 42 % more (the 22-GiB run's 17.8 ms per item at 20).
ITEM_MS = ((24, 12.3), (12, 13.5), (10, 16.0), (6, 21.0))
CHECKPOINTING_SLOWDOWN = 1.42
HEADROOM = 0.9  # of the budget: what the caching allocator reserves beyond what is allocated


@dataclass(frozen=True)
class Shapes:
    """What activation memory scales with."""

    blocks: int  # transformer blocks
    channels: int  # the blocks' width (heads × head dimension)
    tokens: int  # per row: image patches and text tokens
    rows_per_item: int  # transformer rows per training item and per image (2 with classifier-free guidance)
    stored_bytes_per_sample: int  # a trajectory as the epoch keeps it until training (x and v of every step)


@dataclass(frozen=True)
class Sizes:
    """Bytes on one GPU: what stays there all run, and what comes and goes."""

    resident: int  # transformer with its LoRA, decoder, sharded reward models' shards
    optimiser: int  # LoRA gradients and AdamW's two moments
    text_encoders: int  # present while the prompts are encoded
    reward_models: int  # present while sampling and scoring (parked in training)
    transformer_frozen: int  # the transformer's base weights, of `resident`: may be parked while encoding
    workspace_sample: int = 0  # a GPU's fixed costs: cuBLAS and cuDNN workspaces, the decoder's one image
    workspace_train: int = 0


@dataclass(frozen=True)
class MemoryPlan:
    plan: BatchPlan  # the epoch's plan with the executed sizes (and activation checkpointing) that fit
    peaks_gib: dict[str, float]  # estimated, per phase
    transformer_parked_to_encode: bool = False  # its base weights leave the GPU while the text encoders are there

    def describe(self, budget_gib: float) -> str:
        peaks = ", ".join(f"{k} {v:.1f}" for k, v in self.peaks_gib.items())
        return (f"--max-memory-gib {budget_gib:g}: sampling {self.plan.sampling_batch} pairs per call, training "
                f"micro-batches of {self.plan.micro_batch} items" +
                (" with activation checkpointing" if self.plan.activation_checkpointing else "") +
                ("; the transformer parked while the prompts are encoded" if self.transformer_parked_to_encode
                 else "") + f"; estimated peaks (GiB): {peaks}.")


def item_ms_plain(micro_batch: int) -> float:
    """ITEM_MS interpolated linearly in 1 / micro-batch, extrapolated below its smallest micro-batch, flat above
    its largest."""
    x = 1 / min(micro_batch, ITEM_MS[0][0])
    xs = [1 / m for m, _ in ITEM_MS]  # ascending
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    (x0, y0), (x1, y1) = (xs[i - 1], ITEM_MS[i - 1][1]), (xs[i], ITEM_MS[i][1])
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def fit(budget_gib: float, plan: BatchPlan, shapes: Shapes, sizes: Sizes) -> MemoryPlan:
    """The fastest executed sizes whose estimated peaks fit the budget (never larger than the plan's own)."""
    usable = HEADROOM * budget_gib * GIB
    row = shapes.tokens * shapes.channels * shapes.rows_per_item  # per item or image, per block
    stored = 2 * plan.pairs_per_rank * shapes.stored_bytes_per_sample
    # Parking the transformer to encode costs a copy of its base weights back per epoch: only where needed.
    park_transformer = sizes.resident + sizes.text_encoders > usable
    encode = sizes.resident - park_transformer * sizes.transformer_frozen + sizes.text_encoders

    def sample_peak(pairs_per_call: int) -> float:
        return (sizes.resident + sizes.reward_models + stored + 2 * pairs_per_call * row * SAMPLE_BYTES
                + sizes.workspace_sample)

    def train_peak(micro_batch: int, checkpointing: bool) -> float:
        kept = shapes.blocks * (CHECKPOINTED_BYTES if checkpointing else TRAIN_BYTES)
        live = TRAIN_BYTES if checkpointing else 0.0  # the block being recomputed
        return (sizes.resident + sizes.optimiser + stored + micro_batch * row * (kept + live)
                + sizes.workspace_train)

    def item_ms(micro_batch: int, checkpointing: bool) -> float:
        return item_ms_plain(micro_batch) * (CHECKPOINTING_SLOWDOWN if checkpointing else 1)

    calls = [b for b in divisors(plan.pairs_per_rank, plan.sampling_batch) if sample_peak(b) <= usable]
    items_per_step = plan.micro_batch * plan.micro_batches_per_step
    options = [(m, c) for c in (False, True) for m in divisors(items_per_step, plan.micro_batch)
               if train_peak(m, c) <= usable]
    at_rest = max(encode, sample_peak(1), train_peak(1, True))
    if encode > usable or not calls or not options:
        raise ConfigError(
            f"--max-memory-gib {budget_gib:g} is too small for this run: at its smallest batches it needs about "
            f"{at_rest / HEADROOM / GIB:.3g} GiB on each GPU (the transformer and its decoder "
            f"{sizes.resident / GIB:.3g} GiB, the text encoders {sizes.text_encoders / GIB:.3g}, the reward models "
            f"{sizes.reward_models / GIB:.3g}, the epoch's trajectories {stored / GIB:.3g}). Raise the budget, spread "
            "the epoch over more GPUs (fewer pairs and a smaller share of a sharded VLM each), or use a lighter "
            "reward (e.g. --reward-preset pickscore).")
    sampling_batch = max(calls)
    micro_batch, checkpointing = min(options, key=lambda o: (item_ms(*o), -o[0]))
    fitted = dataclasses.replace(plan, sampling_batch=sampling_batch, micro_batch=micro_batch,
                                 micro_batches_per_step=items_per_step // micro_batch,
                                 activation_checkpointing=checkpointing)
    peaks = {"encode": encode, "sample": sample_peak(sampling_batch), "train": train_peak(micro_batch, checkpointing)}
    return MemoryPlan(fitted, {k: v / GIB for k, v in peaks.items()}, park_transformer)


def cap(budget_gib: float, device: torch.device) -> None:
    """Let the caching allocator reserve no more than the budget on this GPU: what does not fit fails there and then."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total), device)


def shapes(backbone: Backbone, sample: SampleConfig, items_per_sample: int) -> Shapes:
    """The run's transformer at its resolution and prompt length."""
    if not isinstance(backbone, SD3):
        raise ConfigError(f"--max-memory-gib plans with activation costs measured on SD3's blocks; a "
                        f"{type(backbone).__name__} model's are not measured yet: drop --max-memory-gib and set "
                        "--sample.batch-size and --train.micro-batch yourself.")
    config = backbone.transformer.config
    channels, side, width = backbone.latent_shape(sample.resolution)
    return Shapes(blocks=config.num_layers, channels=config.num_attention_heads * config.attention_head_dim,
                  tokens=backbone.tokens_per_row(sample.resolution, sample.max_sequence_length),
                  rows_per_item=2 if backbone.uses_cfg(sample.guidance_scale) else 1,
                  stored_bytes_per_sample=2 * items_per_sample * channels * side * width * 4)  # float32 x and v


def sizes(learner: Learner, device: torch.device) -> Sizes:
    """What the learner holds, with every frozen model parked: on a GPU as allocated (a sharded reward model's shard
    included), on the CPU counted."""
    gpu = device.type == "cuda"
    resident = torch.cuda.memory_allocated(device) if gpu else module_bytes([learner.backbone.transformer, learner.backbone.vae])
    # The largest of all ranks: every rank must choose the same sizes (its collectives count on them).
    resident = int(distributed.all_gather_tensor(torch.tensor([resident], device=device)).max())
    optimiser = 3 * tensor_bytes(trainable(learner.lora))  # gradients, AdamW's two moments (made at the first step)
    return Sizes(resident=resident, optimiser=optimiser,
                 text_encoders=learner.text_encoders.nbytes, reward_models=learner.reward_models.nbytes,
                 transformer_frozen=tensor_bytes(frozen_tensors([learner.backbone.transformer])),
                 workspace_sample=int(gpu * SAMPLE_FIXED_GIB * GIB), workspace_train=int(gpu * TRAIN_FIXED_GIB * GIB))
