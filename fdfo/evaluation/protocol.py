"""The paper's evaluation metrics: prompt sets, dealing prompts to ranks, scorers, DreamSim diversity, summaries."""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fdfo import distributed
from fdfo.config import PROJECT_ROOT
from fdfo.errors import UserError
from fdfo.harness.prompts import PUBLISHED_PROMPTS, download_prompts, load_prompts
from fdfo.hub_files import HubFiles, error_line
from fdfo.rewards.registry import Scorers, local_models

# Prompt files in the checkout: the paper's training prompts (given by the user, or fetched by prefetch), and
# Flow-GRPO's and DiffusionNFT's 2,048 test prompts (downloaded on first use).
PROMPT_FILES = {"pickscore_train": PROJECT_ROOT / "prompt_sets" / "pickscore_train.txt",
                "pickscore_test": PROJECT_ROOT / "prompt_sets" / "pickscore_test.txt"}
DOWNLOADED_ON_USE = ("pickscore_test",)
# The HPDv2 benchmark's 3,200 prompts (4 styles × 800), read from the Hugging Face cache: shared like the models
# where HF_HOME is, and never written into a checkout that other nodes may not see.
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
HPDV2 = HubFiles("the HPDv2 benchmark prompts", "zhwang/HPDv2",
                 tuple(f"benchmark/{style}.json" for style in HPDV2_STYLES), repo_type="dataset")


class DreamSimLoadError(UserError, RuntimeError):
    """DreamSim could not be downloaded or read from torch's hub cache; the message says what to do."""


OFFLINE_PROMPTS = PROJECT_ROOT / "prompt_sets" / "demo.txt"


def prompt_set(name: str, offline: bool) -> list[str]:
    """The prompts of a set; with `offline` (a random-weight model) our own demo prompts stand in for it."""
    if offline:
        distributed.print0(f"Random-weight model: using the offline prompts {OFFLINE_PROMPTS} for `{name}`.")
        return load_prompts(OFFLINE_PROMPTS)
    if name == "hpdv2":
        return hpdv2_prompts()
    path = PROMPT_FILES[name]
    if name in DOWNLOADED_ON_USE and not path.exists():
        with distributed.node_leaders_first():
            if distributed.local_rank() == 0 and not path.exists():
                download_prompts(path, PUBLISHED_PROMPTS[path.name])
    return load_prompts(path)


def hpdv2_prompts() -> list[str]:
    """The HPDv2 benchmark prompts, style by style, from the Hub dataset (downloaded into the cache once)."""
    with HPDV2.loading():
        folder = HPDV2.local()
        return [prompt for style in HPDV2_STYLES
                for prompt in json.loads((folder / "benchmark" / f"{style}.json").read_text())]


def select_prompts(prompts: list[str], num_prompts: int, seed: int) -> list[str]:
    """Shuffle with `seed` as the published evaluation does (numpy's legacy RandomState), keep the first
    `num_prompts` (capped at the set's size, with a warning)."""
    if num_prompts > len(prompts):
        warnings.warn(f"--num-prompts {num_prompts} is more than the set's {len(prompts)} prompts; using all.")
        num_prompts = len(prompts)
    shuffled = list(prompts)
    np.random.RandomState(seed).shuffle(shuffled)
    return shuffled[:num_prompts]


def rank_prompt_indices(num_prompts: int, rank: int, world_size: int) -> list[int]:
    """Round-robin dealing of prompt indices to ranks."""
    return list(range(rank, num_prompts, world_size))


def image_seed(base: int, prompt_index: int, num_repeats: int, repeat: int) -> int:
    return base + prompt_index * num_repeats + repeat


def diversity(embeddings: torch.Tensor) -> float:
    """Mean over all pairs of a prompt's repeats of the squared L2 distance between their embeddings: (R, D) → float."""
    pairs = list(itertools.combinations(range(embeddings.shape[0]), 2))
    return float(np.mean([(embeddings[i] - embeddings[j]).pow(2).sum().item() for i, j in pairs]))


@dataclass
class Metric:
    name: str
    score: Callable[[torch.Tensor, list[str]], torch.Tensor]  # uint8 images, prompts → (N,) or (N, D) embeddings


def build_metrics(names: tuple[str, ...], device: torch.device, twins: str | None, vlm_model_name: str) -> list[Metric]:
    """One scorer per metric from the scorer registry, with the published evaluation's settings; each model
    loaded once, the VLM questions sharing one VLM. `twins` ("tiny" or "full"): random-weight stand-ins."""
    scorers = Scorers(device, twins, purpose="metric", vlm_model_name=vlm_model_name)
    return [Metric(name, dreamsim_embedder(device, random=twins is not None) if name == "dreamsim_diversity"
                   else scorers.build(name)) for name in names]


def metric_models(metrics: list[Metric]) -> list[torch.nn.Module]:
    """The networks the metrics hold on this rank, each once: frozen, so they can leave the GPU."""
    return local_models([metric.score for metric in metrics])


def dreamsim_embedder(device: torch.device, random: bool) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """DreamSim embeddings (the real model downloads its backbones on first use; `random`: a fixed random projection)."""
    if random:
        projection = torch.randn(3 * 16 * 16, 32, generator=torch.Generator().manual_seed(0))
        return lambda images, prompts: torch.nn.functional.normalize(torch.nn.functional.interpolate(
            images.float() / 255, size=(16, 16), mode="area").flatten(1) @ projection, dim=-1)
    return DreamSimEmbedder(device)


class DreamSimEmbedder:
    """DreamSim's embeddings of uint8 images, through its own preprocessing."""

    def __init__(self, device: torch.device):
        self.model, self.preprocess = load_dreamsim(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from PIL import Image
        batch = torch.cat([self.preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images.cpu()])
        return self.model.embed(batch.to(self.device)).float()


# facebookresearch/dino's last commit (2023-04-27): DreamSim fetches the DINO ViT-B/16 code from this repository
# with torch.hub, by default from the branch `main`, and runs it.
DINO_COMMIT = "7c446df5b9f45747937fb0d72314eb9f7b66930a"


def load_dreamsim(device: torch.device):
    """DreamSim (its ensemble model, as the published evaluation), downloaded once into torch's hub cache
    (`<hub dir>/dreamsim`, not the working folder), with the DINO code it fetches pinned to DINO_COMMIT.
    Rank 0 downloads first, then the first rank of each other node (where the cache is per node), then the
    others read the cache: never two processes downloading into one folder."""
    from dreamsim import dreamsim
    hub_dir, fetch = torch.hub.get_dir(), torch.hub.load
    cache = Path(hub_dir) / "dreamsim"
    cache.mkdir(parents=True, exist_ok=True)

    def pinned(repo: str, model: str, *args, **kwargs):
        repo = f"facebookresearch/dino:{DINO_COMMIT}" if repo == "facebookresearch/dino:main" else repo
        return fetch(repo, model, *args, trust_repo=True, **kwargs)
    with distributed.node_leaders_first():
        torch.hub.load = pinned
        try:
            with warnings.catch_warnings():  # DreamSim's own code, news to no user (the published evaluation hides them)
                warnings.filterwarnings("ignore", message=".*torch.nn.utils.weight_norm")
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                return dreamsim(pretrained=True, device=str(device), cache_dir=str(cache))
        except OSError as e:  # URLError: no internet, and the cache lacks a file
            raise DreamSimLoadError(
                f"Could not load DreamSim into {cache}, under torch's hub folder ({error_line(e)}): on first use it "
                "downloads its checkpoint from github.com/ssundaram21/dreamsim, the DINO code from "
                f"github.com/facebookresearch/dino (commit {DINO_COMMIT[:7]}) and DINO's weights from "
                "dl.fbaipublicfiles.com. Without internet, run metrics.py with --metrics dreamsim_diversity once on a "
                f"machine online with the same TORCH_HOME (a shared folder, or copy {cache} here), or leave "
                "dreamsim_diversity out.") from e
        finally:  # DreamSim points torch.hub at its cache folder for the whole process: put both back
            torch.hub.load = fetch
            torch.hub.set_dir(hub_dir)


def summarise(name: str, rows: list) -> dict:
    """Mean over images (or, for diversity, over prompts of the mean pairwise distance of their repeats)."""
    if name == "dreamsim_diversity":
        per_prompt: dict[int, list] = {}
        for (i, r), embedding in sorted(rows):
            per_prompt.setdefault(i, []).append(embedding)
        values = [diversity(torch.tensor(e)) for e in per_prompt.values()]
    else:
        values = [v for _, v in rows]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "count": len(values)}


def print_table(results: dict) -> None:
    print(f"{'metric':<20} {'mean':>10} {'std':>10} {'count':>7}")
    for name, r in results.items():
        print(f"{name:<20} {r['mean']:>10.4f} {r['std']:>10.4f} {r['count']:>7}")
