"""A labelled image grid: one column block per prompt with the prompt as caption, and optional row labels."""

from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont

PAD = 8  # pixels between prompt blocks and around captions


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's own scalable font (shipped with Pillow, nothing downloaded)."""
    return ImageFont.load_default(size=size)


def caption_lines(prompt: str, width_px: int, font_size: int) -> list[str]:
    return textwrap.wrap(prompt, width=max(8, int(width_px / (0.55 * font_size)))) or [""]


def grid_size(num_prompts: int, rows: int, cols: int, resolution: int, caption_height: int,
              label_width: int = 0) -> tuple[int, int]:
    """(width, height) of the grid image in pixels."""
    return (label_width + num_prompts * cols * resolution + (num_prompts + 1) * PAD,
            caption_height + rows * resolution + PAD)


def caption_font_size(resolution: int) -> int:
    return max(10, resolution // 16)


def captions(prompts: list[str], cols: int, resolution: int) -> list[list[str]]:
    """Each prompt's caption (numbered), wrapped to the width of its block."""
    return [caption_lines(f"{i + 1}. {p}", cols * resolution, caption_font_size(resolution))
            for i, p in enumerate(prompts)]


def caption_band_height(lines: list[list[str]], resolution: int) -> int:
    """The height of the caption band above the images: the longest caption's lines."""
    return PAD + max(len(l) for l in lines) * (caption_font_size(resolution) + 4)


def planned_grid_size(prompts: list[str], rows: int, cols: int, resolution: int) -> tuple[int, int]:
    """(width, height) in pixels of make_grid's grid (without row labels), known before any image exists."""
    return grid_size(len(prompts), rows, cols, resolution, caption_band_height(
        captions(prompts, cols, resolution), resolution))


def make_grid(images: torch.Tensor, prompts: list[str], rows: int, cols: int,
              row_labels: list[str] | None = None) -> Image.Image:
    """`images` uint8 (len(prompts)·rows·cols, 3, R, R), prompt-major, laid out as one rows × cols block per
    prompt; `row_labels` (one per row, lines split by "\n") are written in a margin on the left."""
    resolution = images.shape[-1]
    font_size = caption_font_size(resolution)
    block_width = cols * resolution
    lines = captions(prompts, cols, resolution)
    caption_height = caption_band_height(lines, resolution)
    label_width = 0
    if row_labels is not None:
        if len(row_labels) != rows:
            raise ValueError(f"Need one label per row: {rows} rows, {len(row_labels)} labels.")
        label_width = PAD + max(int(font(font_size).getlength(line)) for label in row_labels
                                for line in label.split("\n"))
    width, height = grid_size(len(prompts), rows, cols, resolution, caption_height, label_width)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(row_labels or []):
        draw.multiline_text((PAD // 2, caption_height + r * resolution + resolution // 2), label, fill="black",
                            font=font(font_size), spacing=4, anchor="lm")
    per_prompt = rows * cols
    for p, prompt_lines in enumerate(lines):
        left = label_width + PAD + p * (block_width + PAD)
        draw.multiline_text((left, PAD // 2), "\n".join(prompt_lines), fill="black", font=font(font_size), spacing=4)
        for k in range(per_prompt):
            pixels = images[p * per_prompt + k].permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(pixels), (left + (k % cols) * resolution, caption_height + (k // cols) * resolution))
    return canvas
