"""generate.py: load the base model and a LoRA checkpoint, render a labelled grid."""

from __future__ import annotations

from pathlib import Path

from fdfo import distributed
from fdfo.config import PROJECT_ROOT, ConfigError, GenerateConfig, check_generate_config
from fdfo.evaluation.images import generate_images, load_with_checkpoint
from fdfo.evaluation.grid import grid_size, make_grid, planned_grid_size
from fdfo.evaluation.method_protocol import weights_and_settings
from fdfo.harness.prompts import load_prompts
from fdfo.model.loading import check_model_name, planned_resolution

DEFAULT_PROMPTS = PROJECT_ROOT / "prompt_sets" / "generate_default.txt"
# The largest side each format can store: libjpeg's JPEG_MAX_DIMENSION, and WebP's 14-bit sizes. PNG's is 2³¹ − 1.
MAX_SIDE = {".jpg": ("JPEG", 65_500), ".jpeg": ("JPEG", 65_500), ".webp": ("WebP", 16_383)}


def generate(cfg: GenerateConfig) -> Path:
    """Write the grid to cfg.out and return its path."""
    check_generate_config(cfg)
    prompts = load_prompts(cfg.prompts or DEFAULT_PROMPTS)
    # Refused before anything loads, as --out's folder is (check_generate_config): the grid is saved only once every
    # image is generated.
    check_grid_fits(cfg, prompts)
    check_model_name(cfg.pretrained_model)
    cfg, checkpoint = weights_and_settings(cfg)
    backbone = load_with_checkpoint(cfg.pretrained_model, cfg.precision, checkpoint, distributed.init())
    per_prompt = cfg.grid_rows * cfg.grid_cols
    # As published: image i of the grid (prompt-major) starts from seed + i.
    images = generate_images(backbone, [p for p in prompts for _ in range(per_prompt)],
                             [cfg.seed + i for i in range(len(prompts) * per_prompt)], cfg.num_solver_steps,
                             cfg.guidance_scale, cfg.resolution, cfg.max_sequence_length, cfg.batch_size,
                             integer=cfg.integer_timesteps)
    grid = make_grid(images, prompts, cfg.grid_rows, cfg.grid_cols)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)  # the check only probed it
    grid.save(out, **({"quality": 95} if out.suffix.lower() in (".jpg", ".jpeg") else {}))
    print(f"Wrote {out} ({grid.width}×{grid.height} px, {len(prompts)} prompts × {per_prompt} images)", flush=True)
    return out


def check_grid_fits(cfg: GenerateConfig, prompts: list[str]) -> None:
    """The grid's size, from the prompts, the grid and the resolution, within --out's format's largest side."""
    if Path(cfg.out).suffix.lower() not in MAX_SIDE:
        return
    file_format, max_side = MAX_SIDE[Path(cfg.out).suffix.lower()]
    resolution = cfg.resolution or planned_resolution(cfg.pretrained_model)
    width, height = planned_grid_size(prompts, cfg.grid_rows, cfg.grid_cols, resolution)
    if max(width, height) <= max_side:
        return
    fitting = next((n for n in range(len(prompts) - 1, 0, -1)
                    if grid_size(n, cfg.grid_rows, cfg.grid_cols, resolution, caption_height=0)[0] <= max_side), 0)
    fewer = f"fewer prompts (at most {fitting})" if width > max_side and fitting else "fewer or shorter prompts"
    raise ConfigError(f"The grid of {len(prompts)} prompts × {cfg.grid_rows}×{cfg.grid_cols} images of {resolution} "
                      f"px would be {width:,}×{height:,} px, and a {file_format} image is at most {max_side:,} px a "
                      f"side: give {fewer}, a smaller --grid-rows, --grid-cols or --resolution, or an --out ending "
                      f"in .png (--out {Path(cfg.out).with_suffix('.png')}).")

