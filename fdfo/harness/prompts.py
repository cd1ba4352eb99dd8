"""Training prompts: one global, seeded stream, so pair g of epoch e has the same prompt on any rank count."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fdfo.config import project_path
from fdfo.errors import UserError


class PromptFileError(UserError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class PublishedPrompts:
    """A published prompt file, known by its SHA-256."""

    url: str
    sha256: str


# The paper trains on Flow-GRPO's Pick-a-Pic prompts (25,432; the published FDFO README points there), and
# Flow-GRPO and DiffusionNFT evaluate on its test split (2,048): dataset/pickscore/ of github.com/yifan123/flow_grpo.
FLOW_GRPO_FILES = "https://raw.githubusercontent.com/yifan123/flow_grpo/ac4c86e8cae021841f1fde853d340e0db67690dd"
PUBLISHED_PROMPTS = {  # by the name of our copy in prompt_sets/
    "pickscore_train.txt": PublishedPrompts(f"{FLOW_GRPO_FILES}/dataset/pickscore/train.txt",
                                            "2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f"),
    "pickscore_test.txt": PublishedPrompts(f"{FLOW_GRPO_FILES}/dataset/pickscore/test.txt",
                                           "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262"),
}


def download_prompts(path: Path, source: PublishedPrompts) -> None:
    """The published file `source` into `path`, checked against its SHA-256; written whole or not at all (under
    a name of this process's own first: two nodes writing into one shared folder cannot mix their bytes)."""
    try:
        with urllib.request.urlopen(source.url, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise PromptFileError(f"Could not download the prompts from {source.url} ({e}). Without internet, copy that "
                              f"file to {path}.") from None
    if hashlib.sha256(data).hexdigest() != source.sha256:
        raise PromptFileError(f"The file downloaded from {source.url} is not the published one (its SHA-256 differs); "
                              f"nothing was written to {path}.")
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(data)
    partial.replace(path)


def load_prompts(path: Path) -> list[str]:
    """Non-empty lines of a prompt file."""
    path = project_path(path)
    published = PUBLISHED_PROMPTS.get(path.name)
    download = (f"\nDownload the published prompts with:\n  curl -L -o {path} {published.url}\nor fetch everything a "
                "command needs with `python -m fdfo.prefetch -- train.py ...`." if published else "")
    if not path.is_file():
        raise PromptFileError(f"The prompt file {path} does not exist.{download}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"The prompt file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                              "UTF-8, one prompt a line.") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(f"The prompt file {path} holds no prompts (one prompt a line).{download}")
    return prompts


def prompts_digest(prompts: list[str]) -> str:
    """SHA-256 of the prompts as training reads them: a checkpoint records it, so that a resume notices an edited file."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


class PromptStream:
    """Prompt of global pair g in epoch e: position e·N + g of an endless sequence of seeded shuffles. (The
    baselines draw one prompt per group of images, groups 0 … G − 1 at positions e·N …: fewer than N an epoch.)"""

    def __init__(self, prompts: list[str], seed: int, pairs_per_epoch: int):
        self.prompts, self.seed, self.pairs_per_epoch = prompts, seed, pairs_per_epoch
        self._shuffles: dict[int, np.ndarray] = {}

    def _shuffle(self, cycle: int) -> np.ndarray:
        """The order of pass `cycle` over the prompt file (the latest few are kept)."""
        if cycle not in self._shuffles:
            if len(self._shuffles) >= 4:
                self._shuffles.pop(min(self._shuffles))
            self._shuffles[cycle] = np.random.default_rng([self.seed, cycle]).permutation(len(self.prompts))
        return self._shuffles[cycle]

    def position(self, epoch: int) -> int:
        """The stream position of `epoch`'s first prompt."""
        return epoch * self.pairs_per_epoch

    def prompts_for(self, epoch: int, pair_ids: range | list[int]) -> list[str]:
        out = []
        for g in pair_ids:
            n = self.position(epoch) + g
            cycle, index = divmod(n, len(self.prompts))
            out.append(self.prompts[self._shuffle(cycle)[index]])
        return out
