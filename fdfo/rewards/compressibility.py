"""JPEG compressibility (as in DDPO): the negated size of the image as a JPEG, in kilobytes."""

from __future__ import annotations

import io

import torch
from PIL import Image

from fdfo.evaluation.images import to_uint8

JPEG_QUALITY = 95


class Compressibility:
    """−(JPEG bytes at quality 95) / 1000: higher for images that compress better."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        sizes = []
        # float32 x·255 + 0.5, truncated: DDPO's round(255·x) but for exact ties (x·255 = k + ½, k even)
        for pixels in to_uint8(images.detach().float().cpu()).permute(0, 2, 3, 1).numpy():
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
            sizes.append(buffer.tell())
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device) / 1000
