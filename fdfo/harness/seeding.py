"""Every random draw of a run derives from (seed, epoch, index): the same on any rank count and after resume."""

from __future__ import annotations

import numpy as np
import torch

PAIR_NOISE, ITEM_SHUFFLE, IMAGE_NOISE, TRAINING_NOISE = 0, 1, 2, 3  # streams


def derived_seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


def pair_generator(seed: int, epoch: int, pair: int, device: torch.device) -> torch.Generator:
    """The generator of global pair `pair` in `epoch`: its base noise and both branches' churn."""
    return torch.Generator(device).manual_seed(derived_seed(seed, PAIR_NOISE, epoch, pair))


def item_permutation(seed: int, epoch: int, num_items: int) -> torch.Tensor:
    """The epoch's shuffle of all (sample, timestep) items of all ranks, identical on every rank."""
    generator = torch.Generator().manual_seed(derived_seed(seed, ITEM_SHUFFLE, epoch))
    return torch.randperm(num_items, generator=generator)


def image_generator(seed: int, epoch: int, image: int, device: torch.device, stream: int = IMAGE_NOISE
                    ) -> torch.Generator:
    """The generator of global image `image` in `epoch` (the baselines' single trajectories): its noise in
    sampling (IMAGE_NOISE), or what training draws for it (TRAINING_NOISE: DiffusionNFT's noise levels and noise)."""
    return torch.Generator(device).manual_seed(derived_seed(seed, stream, epoch, image))
