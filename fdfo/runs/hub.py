"""Where a checkpoint lives: a local folder, a run folder, `hf:<org>/<repo>/<subdir>` or a Hub tree URL."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fdfo.runs.checkpoint import CheckpointError, find_checkpoint
from fdfo.runs.ema import ema_folder
from fdfo.model.lora import ADAPTER_FILES

HUB_URL = re.compile(r"https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/]+)/(?P<subdir>.+?)/?$")


@dataclass(frozen=True)
class HubCheckpoint:
    repo: str  # <org>/<repo>
    subdir: str  # folder inside the repo
    revision: str = "main"


def parse_checkpoint(spec: str) -> HubCheckpoint | Path:
    """`hf:` and `https://huggingface.co/...` forms become a HubCheckpoint, anything else a local path."""
    if spec.startswith("hf:"):
        parts = spec[3:].strip("/").split("/", 2)
        if len(parts) < 3 or not all(parts):
            raise CheckpointError(f"--checkpoint {spec}: write it as hf:<org>/<repo>/<subfolder>, e.g. "
                                  "hf:nvidia/finite-difference-flow-optimization/fdfo-combined-reward-no-cfg/epoch-0000100")
        return HubCheckpoint(repo=f"{parts[0]}/{parts[1]}", subdir=parts[2])
    if spec.startswith(("http://", "https://")):
        match = HUB_URL.match(spec)
        if match is None:
            raise CheckpointError(f"--checkpoint {spec}: a Hub URL must look like "
                                  "https://huggingface.co/<org>/<repo>/tree/<revision>/<subfolder>.")
        return HubCheckpoint(**match.groupdict())
    return Path(spec)


def resolve_checkpoint(spec: str | None, ema: bool = False) -> Path | None:
    """A local folder holding the LoRA adapter files (downloading only that subfolder for Hub forms); with `ema`,
    the checkpoint's EMA LoRA."""
    if spec is None:
        return None
    where = parse_checkpoint(spec)
    if isinstance(where, HubCheckpoint):
        from huggingface_hub import snapshot_download
        root = snapshot_download(where.repo, revision=where.revision, allow_patterns=[f"{where.subdir}/*"])
        where = Path(root) / where.subdir
    checkpoint = find_checkpoint(where, required=ADAPTER_FILES[1])
    return ema_folder(checkpoint) if ema else checkpoint
