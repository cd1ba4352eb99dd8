"""Training prompts: one global, seeded stream, so pair g of epoch e has the same prompt on any rank count."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fdfo.config import project_path
from fdfo.errors import UserError

PICKSCORE_TRAIN_URL = (
    "https://raw.githubusercontent.com/NVlabs/finite-difference-flow-optimization/main/prompt_sets/pickscore_train.txt"
)


class PromptFileError(UserError, FileNotFoundError):
    pass


def load_prompts(path: Path) -> list[str]:
    """Non-empty lines of a prompt file."""
    path = project_path(path)
    download = (f"\nDownload the paper's training prompts with:\n  curl -L -o prompt_sets/pickscore_train.txt "
                f"{PICKSCORE_TRAIN_URL}" if path.name == "pickscore_train.txt" else "")
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
