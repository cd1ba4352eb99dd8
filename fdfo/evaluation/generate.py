"""generate.py: load the base model and a LoRA checkpoint, render a labelled grid."""

from __future__ import annotations

from pathlib import Path

from fdfo import distributed
from fdfo.config import PROJECT_ROOT, GenerateConfig, check_generate_config
from fdfo.evaluation.images import generate_images, load_with_checkpoint
from fdfo.evaluation.grid import make_grid
from fdfo.evaluation.method_protocol import weights_and_settings
from fdfo.harness.prompts import load_prompts

DEFAULT_PROMPTS = PROJECT_ROOT / "prompt_sets" / "generate_default.txt"


def generate(cfg: GenerateConfig) -> Path:
    """Write the grid to cfg.out and return its path."""
    check_generate_config(cfg)
    prompts = load_prompts(cfg.prompts or DEFAULT_PROMPTS)
    cfg, checkpoint = weights_and_settings(cfg)
    pipe = load_with_checkpoint(cfg.pretrained_model, cfg.precision, checkpoint, distributed.init())
    per_prompt = cfg.grid_rows * cfg.grid_cols
    # As published: image i of the grid (prompt-major) starts from seed + i.
    images = generate_images(pipe, [p for p in prompts for _ in range(per_prompt)],
                             [cfg.seed + i for i in range(len(prompts) * per_prompt)], cfg.num_solver_steps,
                             cfg.guidance_scale, cfg.resolution, cfg.max_sequence_length, cfg.batch_size,
                             integer=cfg.integer_timesteps)
    grid = make_grid(images, prompts, cfg.grid_rows, cfg.grid_cols)
    out = Path(cfg.out)
    grid.save(out, **({"quality": 95} if out.suffix.lower() in (".jpg", ".jpeg") else {}))
    print(f"Wrote {out} ({grid.width}×{grid.height} px, {len(prompts)} prompts × {per_prompt} images)", flush=True)
    return out
