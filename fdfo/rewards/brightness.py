"""Brightness: the mean pixel value of the image, a smooth reward the offline demo's tiny model can climb."""

from __future__ import annotations

import torch


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean of the image's pixels in [0, 1], one value per image: (B, 3, H, W) → (B,)."""
    return images.float().mean(dim=(1, 2, 3))
