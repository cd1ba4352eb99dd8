"""metrics.py's body, the paper's evaluation: load the scorers, generate with the plain pipeline, score, gather,
average."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fdfo import distributed
from fdfo.config import MetricsConfig, check_metrics_config, to_jsonable
from fdfo.evaluation.protocol import (Metric, build_metrics, image_seed, metric_models, print_table, prompt_set,
                                      rank_prompt_indices, select_prompts, summarise)
from fdfo.evaluation.images import generate_images, load_with_checkpoint
from fdfo.evaluation.method_protocol import weights_and_settings
from fdfo.model.loading import check_model_name
from fdfo.model.parking import Parking
from fdfo.rewards.registry import twins_for


def evaluate(cfg: MetricsConfig) -> dict:
    """Run the evaluation; rank 0 prints the table, writes --out and returns the results."""
    check_metrics_config(cfg)
    check_model_name(cfg.pretrained_model)
    start = time.time()
    twins = twins_for(cfg.pretrained_model)
    cfg, checkpoint = weights_and_settings(cfg)
    device = distributed.init()
    prompts = select_prompts(prompt_set(cfg.prompt_set, twins is not None), cfg.num_prompts, cfg.prompt_seed)

    # The scorers load first, so that one that cannot load fails before any image is generated; their models
    # wait off the GPU while the pipeline generates (the VLM alone is 7B parameters), as in training.
    metrics = build_metrics(cfg.metrics, device, twins, cfg.vlm_model_name)
    scorer_models = Parking(metric_models(metrics), device)
    scorer_models.park()

    # Generate this rank's images with the plain pipeline.
    backbone = load_with_checkpoint(cfg.pretrained_model, cfg.precision, checkpoint, device)
    mine = rank_prompt_indices(len(prompts), distributed.rank(), distributed.world_size())
    jobs = [(i, r) for i in mine for r in range(cfg.num_repeats)]
    images = generate_images(backbone, [prompts[i] for i, _ in jobs],
                             [image_seed(cfg.image_seed, i, cfg.num_repeats, r) for i, r in jobs],
                             cfg.num_solver_steps, cfg.guidance_scale, cfg.resolution, cfg.max_sequence_length,
                             cfg.batch_size, integer=cfg.integer_timesteps)
    del backbone
    scorer_models.to_device()

    results = {metric.name: score_metric(metric, images, [prompts[i] for i, _ in jobs], jobs, cfg.batch_size)
               for metric in metrics}
    report = {"config": to_jsonable(cfg), "checkpoint": str(checkpoint) if checkpoint else None,
              "num_prompts": len(prompts), "world_size": distributed.world_size(),
              "elapsed_s": time.time() - start, "results": results}
    if distributed.is_main():
        print_table(results)
        if cfg.out is not None:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def score_metric(metric: Metric, images: torch.Tensor, prompts: list[str], jobs: list[tuple[int, int]],
                 batch_size: int) -> dict:
    """The summary of one metric over every rank's images: this rank's in batches, then (prompt index, repeat,
    value) gathered from all ranks."""
    values = torch.cat([metric.score(images[k:k + batch_size], prompts[k:k + batch_size]).float().cpu()
                        for k in range(0, len(jobs), batch_size)]) if jobs else torch.empty(0)
    gathered = [row for part in distributed.all_gather_objects(list(zip(jobs, values.tolist()))) for row in part]
    return summarise(metric.name, gathered)
