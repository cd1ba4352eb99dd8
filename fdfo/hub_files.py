"""What fdfo reads from the Hugging Face Hub, named as files of repos: the loaders take their models from the local
copy of exactly these files (downloaded, or offline found in the cache), and `python -m fdfo.prefetch` fetches the
same lists ahead of a run, so what it fetches is what the run reads."""

from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from huggingface_hub import constants as hub_constants

from fdfo.errors import UserError

# What the loaders (transformers, diffusers, huggingface_hub) raise for files that are not there or cannot be
# fetched: OSError (URLError, HfHubHTTPError and LocalEntryNotFoundError are OSErrors), ValueError (a name that
# is neither a folder nor a Hub id: HFValidationError, diffusers' own).
LOAD_ERRORS = (OSError, ValueError)


class ModelLoadError(UserError, RuntimeError):
    """A model (or other files from the Hugging Face Hub) could not be loaded; the message says what to do."""


@contextlib.contextmanager
def from_hub(what: str, repo_id: str, download_flags: str = "", hint: str = "") -> Iterator[None]:
    """Load `what` from `repo_id` (a Hub repo or a local folder) inside this block: the loader's error for files
    that are missing or cannot be fetched becomes a ModelLoadError that names the repo, says whether
    HF_HUB_OFFLINE is set and what to do, followed by `hint`. `download_flags` complete the `hf download` command
    it suggests (e.g. --repo-type dataset, --include 'folder/*')."""
    try:
        yield
    except LOAD_ERRORS as e:
        raise ModelLoadError(not_loaded(what, repo_id, e, download_flags) + hint) from e


def not_loaded(what: str, repo_id: str, error: Exception, download_flags: str = "") -> str:
    """The sentence of from_hub's error."""
    cause = error_line(error)
    if Path(repo_id).exists():
        return (f"Could not load {what} from the local folder {repo_id} ({cause}); check that the folder holds the "
                "whole model, as its Hub repo does.")
    download = f"`hf download {repo_id}{' ' + download_flags if download_flags else ''}`"
    cache = hub_constants.HF_HUB_CACHE
    elsewhere = f"run {download} on a machine online with the same HF_HOME (a shared folder, or copy {cache} here)"
    if hub_constants.is_offline_mode():
        todo = (f"HF_HUB_OFFLINE is set and the Hugging Face cache {cache} does not hold it: {elsewhere}, or unset "
                "HF_HUB_OFFLINE to download it here.")
    else:
        todo = (f"HF_HUB_OFFLINE is not set, so it was to be downloaded into the Hugging Face cache {cache}, which "
                f"needs huggingface.co to be reachable; without internet, {elsewhere} and set HF_HUB_OFFLINE=1.")
    return f"Could not load {what} from the Hugging Face Hub repo `{repo_id}` ({cause}). {todo}"


def error_line(error: BaseException) -> str:
    """`Type: the first sentence of its message`, for a sentence that quotes an error (the loaders' messages run to
    several sentences and lines, the first says what failed)."""
    sentence = re.split(r"\.\s", str(error).strip(), maxsplit=1)[0].rstrip(".")
    if sentence.count("(") > sentence.count(")"):  # the sentence ended inside a parenthesis: drop its start
        sentence = sentence[:sentence.rindex("(")].rstrip()
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


# A transformers model's folder: configs, tokenizers, processors, chat templates, and its weights under
# transformers' names (a single file or shards; .bin only where a folder lacks .safetensors, as transformers
# chooses). Single-file checkpoints of other tools (e.g. open_clip_model.safetensors) are not read.
MODEL_METADATA = ("*.json", "*.txt", "*.model", "*.jinja")
MODEL_WEIGHTS = ("model*.safetensors", "pytorch_model*.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class HubFiles:
    """The files of one repo (or a local folder) that one model, dataset or checkpoint is read from."""

    what: str  # for messages: "the base model", "the pickscore scorer's model", …
    repo_id: str  # Hub id, or a local folder (read as it is)
    patterns: tuple[str, ...]  # fnmatch patterns over the repo's file paths, as `hf download --include`
    repo_type: str = "model"
    revision: str = "main"

    @property
    def is_local(self) -> bool:
        return Path(self.repo_id).is_dir()

    def download_flags(self) -> str:
        """The flags of the `hf download` command that fetches these files (for messages)."""
        flags = ([f"--repo-type {self.repo_type}"] if self.repo_type != "model" else []) + \
            ([f"--revision {self.revision}"] if self.revision != "main" else [])
        return " ".join(flags + [f"--include '{p}'" for p in self.patterns])

    def loading(self, hint: str = "") -> contextlib.AbstractContextManager:
        """Inside this block, a file that is missing or cannot be fetched is a ModelLoadError saying what to do."""
        return from_hub(self.what, self.repo_id, self.download_flags(), hint)

    def files(self) -> list[str]:
        """The repo's files these are: the Hub's list online, the cache's copy offline; where a folder holds
        weights as .safetensors, its .bin weights are left out."""
        files = select(self.patterns, repo_files(self.repo_id, self.repo_type, self.revision))
        if not files:
            raise FileNotFoundError(f"no file of the repo matches {' or '.join(self.patterns)}")
        return files

    def local(self, files: list[str] | None = None) -> Path:
        """The local folder holding these files (call it inside `loading()`; `files`: their list if already
        known): downloaded into the Hugging Face cache where it lacks them (only these files), or the folder
        itself for a local folder."""
        if self.is_local:
            return Path(self.repo_id)
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(self.repo_id, repo_type=self.repo_type, revision=self.revision,
                                      allow_patterns=self.files() if files is None else files))


def repo_files(repo_id: str, repo_type: str, revision: str) -> list[str]:
    """Every file of the repo at `revision`: listed by the Hub, or (HF_HUB_OFFLINE) found in the cache's snapshot."""
    from huggingface_hub import HfApi, snapshot_download
    if not hub_constants.is_offline_mode():
        return HfApi().list_repo_files(repo_id, repo_type=repo_type, revision=revision)
    root = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True))
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


def select(patterns: tuple[str, ...], files: list[str]) -> list[str]:
    """The files matching a pattern, less the .bin weights of a folder that has .safetensors weights."""
    matched = [f for f in files if any(fnmatch.fnmatchcase(f, p) for p in patterns)]
    with_safetensors = {PurePosixPath(f).parent for f in matched if f.endswith(".safetensors")}
    return sorted(f for f in matched if not (f.endswith(".bin") and PurePosixPath(f).parent in with_safetensors))


def model_files(what: str, repo_id: str) -> HubFiles:
    """A transformers model's folder at the repo's root: its configs and processor files, and its weights."""
    return HubFiles(what, repo_id, MODEL_METADATA + MODEL_WEIGHTS)


def processor_files(what: str, repo_id: str) -> HubFiles:
    """A processor (tokenizer, image processor) alone: no weights."""
    return HubFiles(what, repo_id, MODEL_METADATA)


def merged_files(wanted: list[HubFiles]) -> list[HubFiles]:
    """One entry per repo, with the patterns of all entries for it (a processor from the model's own repo, the
    VLM of three questions): a repo listed and fetched once."""
    by_repo: dict[tuple[str, str, str], HubFiles] = {}
    for files in wanted:
        key = (files.repo_id, files.repo_type, files.revision)
        if key in by_repo:
            known = by_repo[key]
            patterns = known.patterns + tuple(p for p in files.patterns if p not in known.patterns)
            files = HubFiles(known.what, files.repo_id, patterns, files.repo_type, files.revision)
        by_repo[key] = files
    return list(by_repo.values())
