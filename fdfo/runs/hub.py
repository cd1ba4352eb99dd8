"""Where a checkpoint lives: a local folder, a run folder, `hf:<org>/<repo>/<subdir>` or a Hub tree URL."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hub_constants

from fdfo.runs.checkpoint import CheckpointError, find_checkpoint
from fdfo.runs.ema import ema_folder
from fdfo.hub_files import from_hub
from fdfo.model.lora_folder import ADAPTER_FILES

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
        where = download_checkpoint(where)
    checkpoint = find_checkpoint(where, required=ADAPTER_FILES[1])
    return ema_folder(checkpoint) if ema else checkpoint


CHECKPOINT_IN_RUN = re.compile(r"(?:checkpoints/)?epoch-\d+/" + re.escape(ADAPTER_FILES[1]))  # below a run folder


def checkpoint_to_download(hub: HubCheckpoint) -> str:
    """The repo folder to download: `hub.subdir` itself, or where it is a run folder (published layout
    `<run>/epoch-*`, or ours `<run>/checkpoints/epoch-*`), its newest checkpoint alone — not every epoch.
    Offline, the repo cannot be listed: the cache's copy of `hub.subdir` is used as it is."""
    if hub_constants.is_offline_mode() or re.fullmatch(r"(.*/)?epoch-\d+", hub.subdir):
        return hub.subdir
    from huggingface_hub import HfApi
    with from_hub(f"the list of files of `{hub.subdir}`", hub.repo):
        files = HfApi().list_repo_files(hub.repo, revision=hub.revision)
    prefix = hub.subdir.rstrip("/") + "/"
    checkpoints = [prefix + f[len(prefix):].rpartition("/")[0] for f in files
                   if f.startswith(prefix) and CHECKPOINT_IN_RUN.fullmatch(f[len(prefix):])]
    return max(checkpoints, key=lambda folder: folder.rpartition("/")[2], default=hub.subdir)


def download_checkpoint(hub: HubCheckpoint) -> Path:
    """The local copy of the Hub checkpoint's folder (only that folder is downloaded, into the Hugging Face cache)."""
    from huggingface_hub import snapshot_download
    subdir = checkpoint_to_download(hub)
    flags = f"--include '{subdir}/*'" + (f" --revision {hub.revision}" if hub.revision != "main" else "")
    with from_hub(f"the checkpoint `{subdir}`", hub.repo, flags):
        root = snapshot_download(hub.repo, revision=hub.revision, allow_patterns=[f"{subdir}/*"])
    folder = Path(root) / subdir
    if not folder.is_dir():  # nothing matched: the folder is not in the repo (or, offline, not in the cache)
        offline = hub_constants.is_offline_mode()
        where = "the Hugging Face cache's copy of" if offline else "the Hub repo"
        raise CheckpointError(f"There is no folder `{hub.subdir}` in {where} `{hub.repo}` (revision {hub.revision}); "
                              f"check the path on https://huggingface.co/{hub.repo}/tree/{hub.revision}"
                              + (", or unset HF_HUB_OFFLINE to download it." if offline else "."))
    return folder
