"""Our churn schedules against the published code's, executed side by side on the same noise levels and draws.

    python bench/churn_side_by_side.py --published PATH [--out bench/results/churn-side-by-side.json]

PATH is a checkout of NVlabs/finite-difference-flow-optimization (never committed here): its
fdfo/noise_schedules.py runs unchanged, with its own fdfo/config.py. For each schedule, setting and seed, its
`sample_densities()` draws from torch's global generator seeded with the seed, and its churn density
`pdf_discretized(timesteps / 1000, churn_scaling=True)`, with the 0 its sampler appends, is compared with ours
fed the same normal numbers (fdfo/formulas/churn.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fdfo.formulas.churn import interval_gammas, prior_gammas, raw_gammas  # noqa: E402
from fdfo.model.sd3 import SD3  # noqa: E402
from fdfo.model.tiny import random_pipeline, sd3_scheduler  # noqa: E402


def load_published(root: Path):
    """Its noise_schedules module, importing its own fdfo.config (ours is put back afterwards)."""
    def load(name: str, path: Path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    ours = sys.modules.get("fdfo.config")
    sys.modules["fdfo.config"] = load("published_fdfo_config", root / "fdfo" / "config.py")
    try:
        return load("published_noise_schedules", root / "fdfo" / "noise_schedules.py")
    finally:
        if ours is None:
            sys.modules.pop("fdfo.config")
        else:
            sys.modules["fdfo.config"] = ours


def timesteps(num_steps: int) -> torch.Tensor:
    """SD3's flow-match scheduler (shift 3) timesteps, as the published sampler gets them."""
    scheduler = sd3_scheduler()
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    theirs = load_published(args.published)
    cases = [("raw", dict(churn_weight=0.0025)), ("raw", dict(churn_weight=0.03)),
             ("interval", dict(mu=1.0, sigma=1.5, churn_weight=1.0, churn_weight_sigma=0.0, soft_sigma=0.25)),
             ("interval", dict(mu=-0.5, sigma=0.8, churn_weight=0.3, churn_weight_sigma=0.7, soft_sigma=0.6)),
             ("interval", dict(mu=8.0, sigma=0.1, churn_weight=1.0, churn_weight_sigma=0.0, soft_sigma=0.05)),
             ("prior", dict(churn_weight=0.1, churn_weight_sigma=1.0)), ("prior", dict(churn_weight=0.5, churn_weight_sigma=0.0))]
    classes = {"raw": theirs.RawChurnScheduler, "interval": theirs.IntervalScheduler, "prior": theirs.PriorScheduler}
    rows = []
    for num_steps in (10, 40):
        ts = timesteps(num_steps) / 1000
        levels = SD3(random_pipeline("tiny")).sigmas(num_steps, None, torch.device("cpu"))[:-1] * 1000 / 1000
        assert torch.equal(levels, ts.float()), "our noise levels differ from the published sampler's"
        for name, settings in cases:
            worst, exact = 0.0, True
            for seed in range(200):
                torch.manual_seed(seed)
                density, _ = classes[name](**settings).sample_densities()
                published = torch.cat([density.pdf_discretized(ts, churn_scaling=True).float(), torch.zeros(1)])
                torch.manual_seed(seed)  # the same normal numbers, in the same order
                if name == "raw":
                    ours = torch.tensor(raw_gammas(num_steps, settings["churn_weight"]), dtype=torch.float32)
                elif name == "interval":
                    ours = interval_gammas(levels, torch.stack([torch.randn(()), torch.randn(())]), **settings)
                else:
                    ours = prior_gammas(levels, torch.randn(()).view(1), **settings)
                worst = max(worst, (ours - published).abs().max().item())
                exact &= torch.equal(ours, published)
            rows.append({"schedule": name, "settings": settings, "num_steps": num_steps, "seeds": 200,
                         "max_abs_difference": worst, "bit_identical": exact})
            print(f"{name:9s} T={num_steps:2d} {settings}: max |γ ours − γ published| = {worst:.3g}"
                  f"{' (bit for bit)' if exact else ''}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
