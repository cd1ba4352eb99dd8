"""metrics.py's body, the paper's evaluation: generate with the plain pipeline, score, gather, average."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fdfo import distributed
from fdfo.config import MetricsConfig, check_metrics_config, to_jsonable
from fdfo.evaluation.protocol import build_metrics, image_seed, print_table, prompt_set, rank_prompt_indices, select_prompts, summarise
from fdfo.evaluation.images import generate_images, load_with_checkpoint
from fdfo.evaluation.method_protocol import weights_and_settings
from fdfo.rewards.registry import twins_for


def evaluate(cfg: MetricsConfig) -> dict:
    """Run the evaluation; rank 0 prints the table, writes --out and returns the results."""
    check_metrics_config(cfg)
    start = time.time()
    twins = twins_for(cfg.pretrained_model)
    cfg, checkpoint = weights_and_settings(cfg)
    device = distributed.init()
    prompts = select_prompts(prompt_set(cfg.prompt_set, twins is not None), cfg.num_prompts, cfg.prompt_seed)

    # Generate this rank's images with the plain pipeline.
    pipe = load_with_checkpoint(cfg.pretrained_model, cfg.precision, checkpoint, device)
    mine = rank_prompt_indices(len(prompts), distributed.rank(), distributed.world_size())
    jobs = [(i, r) for i in mine for r in range(cfg.num_repeats)]
    images = generate_images(pipe, [prompts[i] for i, _ in jobs],
                             [image_seed(cfg.image_seed, i, cfg.num_repeats, r) for i, r in jobs],
                             cfg.num_solver_steps, cfg.guidance_scale, cfg.resolution, cfg.max_sequence_length,
                             cfg.batch_size, integer=cfg.integer_timesteps)
    del pipe

    # Score them with every metric, in batches; gather (prompt index, repeat, value) from all ranks.
    results = {}
    for metric in build_metrics(cfg.metrics, device, twins, cfg.vlm_model_name):
        values = torch.cat([metric.score(images[k:k + cfg.batch_size], [prompts[i] for i, _ in jobs[k:k + cfg.batch_size]])
                            .float().cpu() for k in range(0, len(jobs), cfg.batch_size)]) if jobs else torch.empty(0)
        gathered = [row for part in distributed.all_gather_objects(list(zip(jobs, values.tolist()))) for row in part]
        results[metric.name] = summarise(metric.name, gathered)

    report = {"config": to_jsonable(cfg), "checkpoint": str(checkpoint) if checkpoint else None,
              "num_prompts": len(prompts), "world_size": distributed.world_size(),
              "elapsed_s": time.time() - start, "results": results}
    if distributed.is_main():
        print_table(results)
        if cfg.out is not None:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.out).write_text(json.dumps(report, indent=2) + "\n")
    return report
