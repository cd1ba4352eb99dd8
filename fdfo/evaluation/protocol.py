"""The paper's evaluation metrics: prompt sets, dealing prompts to ranks, scorers, DreamSim diversity, summaries."""

from __future__ import annotations

import hashlib
import itertools
import json
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fdfo import distributed
from fdfo.config import PROJECT_ROOT
from fdfo.errors import UserError
from fdfo.harness.prompts import load_prompts
from fdfo.model.loading import error_line, from_hub
from fdfo.rewards.registry import Scorers, local_models

PROMPT_SETS = {"pickscore_train": PROJECT_ROOT / "prompt_sets" / "pickscore_train.txt",
               "pickscore_test": PROJECT_ROOT / "prompt_sets" / "pickscore_test.txt",
               "hpdv2": PROJECT_ROOT / "prompt_sets" / "hpdv2.json"}
# Flow-GRPO's and DiffusionNFT's test prompts: dataset/pickscore/test.txt of github.com/yifan123/flow_grpo (2,048).
PICKSCORE_TEST_URL = ("https://raw.githubusercontent.com/yifan123/flow_grpo/ac4c86e8cae021841f1fde853d340e0db67690dd/"
                      "dataset/pickscore/test.txt")
PICKSCORE_TEST_SHA256 = "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262"


class PromptSetError(UserError, RuntimeError):
    pass


class DreamSimLoadError(UserError, RuntimeError):
    """DreamSim could not be downloaded or read from torch's hub cache; the message says what to do."""


OFFLINE_PROMPTS = PROJECT_ROOT / "prompt_sets" / "demo.txt"
HPDV2_REPO = "zhwang/HPDv2"  # a Hub dataset
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")


def prompt_set(name: str, offline: bool) -> list[str]:
    """The prompts of a set; with `offline` (a random-weight model) our own demo prompts stand in for it."""
    if offline:
        distributed.print0(f"Random-weight model: using the offline prompts {OFFLINE_PROMPTS} for `{name}`.")
        return load_prompts(OFFLINE_PROMPTS)
    path = PROMPT_SETS[name]
    download = {"hpdv2": download_hpdv2, "pickscore_test": download_pickscore_test}.get(name)
    if download is not None and not path.exists():
        with distributed.rank0_first():
            if distributed.is_main() and not path.exists():
                download(path)
    if name == "hpdv2":
        return json.loads(path.read_text())
    return load_prompts(path)


def download_hpdv2(path: Path) -> None:
    """The HPDv2 benchmark's 3,200 prompts (4 styles × 800) from the Hub dataset, once, into `path`."""
    from huggingface_hub import hf_hub_download
    with from_hub("the HPDv2 benchmark prompts", HPDV2_REPO, "--repo-type dataset --include 'benchmark/*.json'",
                  hint=f" Or copy {path.name} from a checkout that has it to {path}."):
        files = [hf_hub_download(HPDV2_REPO, f"benchmark/{style}.json", repo_type="dataset") for style in HPDV2_STYLES]
    prompts = [prompt for file in files for prompt in json.loads(Path(file).read_text())]
    path.write_text(json.dumps(prompts, indent=0) + "\n")


def download_pickscore_test(path: Path, url: str = PICKSCORE_TEST_URL) -> None:
    """Flow-GRPO's PickScore test prompts, once, into `path`, checked against the published file's SHA-256."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise PromptSetError(f"Could not download the pickscore_test prompts from {url} ({e}). Without internet, copy "
                             f"that file (Flow-GRPO's dataset/pickscore/test.txt) to {path}.") from None
    if hashlib.sha256(data).hexdigest() != PICKSCORE_TEST_SHA256:
        raise PromptSetError(f"The file downloaded from {url} is not Flow-GRPO's test.txt (its SHA-256 differs); "
                             f"nothing was written to {path}.")
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


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
    Rank 0 downloads first; the others then read the cache."""
    from dreamsim import dreamsim
    hub_dir, fetch = torch.hub.get_dir(), torch.hub.load
    cache = Path(hub_dir) / "dreamsim"
    cache.mkdir(parents=True, exist_ok=True)

    def pinned(repo: str, model: str, *args, **kwargs):
        repo = f"facebookresearch/dino:{DINO_COMMIT}" if repo == "facebookresearch/dino:main" else repo
        return fetch(repo, model, *args, trust_repo=True, **kwargs)
    with distributed.rank0_first():
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
