"""JPEG compressibility (as in DDPO): the negated size of the image as a JPEG, in kilobytes."""

from __future__ import annotations

import io

import torch
from PIL import Image

JPEG_QUALITY = 95


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float (B, 3, H, W) → uint8 (B, H, W, 3) as round(255·x)."""
    return (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class Compressibility:
    """−(JPEG bytes at quality 95) / 1000: higher for images that compress better."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        sizes = []
        for pixels in to_uint8(images).numpy():
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
            sizes.append(buffer.tell())
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device) / 1000
