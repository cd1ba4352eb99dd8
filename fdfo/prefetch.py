"""Download what a command line will read, once, on a machine that is online (a cluster's login node), into the
caches its runs then read offline (HF_HUB_OFFLINE=1):

    python -m fdfo.prefetch -- train.py --reward-preset combined
    python -m fdfo.prefetch -- metrics.py --checkpoint hf:nvidia/finite-difference-flow-optimization/fdfo-combined-reward-no-cfg --metrics pickscore hpsv2 dreamsim_diversity

The command's own settings decide, through the lists the loaders read from (fdfo/hub_files.py): the base model's
folders the pipeline loads (not its single-file checkpoints), each reward or metric model and processor, the
HPDv2 prompts, a checkpoint given as `hf:` or a Hub URL (its newest epoch alone for a run), the published prompt
files the command names, and DreamSim's weights (torch's hub folder, TORCH_HOME).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import constants as hub_constants

from fdfo.errors import UserError
from fdfo.hub_files import HubFiles


class PrefetchError(UserError, ValueError):
    pass


@dataclass
class Needs:
    """What one command line reads from the network."""

    hub: list[HubFiles] = field(default_factory=list)
    checkpoint: str | None = None  # `hf:` or a Hub URL
    prompt_files: list[Path] = field(default_factory=list)  # published prompt files (prompt_sets/)
    dreamsim: bool = False


COMMANDS = ("train.py", "generate.py", "metrics.py", "export.py")


def needs(command: str, args: list[str]) -> Needs:
    """What `command args` (one of COMMANDS) will read, from its settings parsed as the command parses them.
    For metrics.py and generate.py, whose defaults follow the checkpoint's method, a Hub checkpoint is
    downloaded here to read its method."""
    from fdfo.cli import parse
    from fdfo.config import ExportConfig, GenerateConfig, MetricsConfig, TrainConfig
    from fdfo.harness.prompts import PUBLISHED_PROMPTS
    from fdfo.model.loading import RANDOM_MODELS, pipeline_files, transformer_files
    from fdfo.rewards.registry import reward_terms, scorer_files

    name = Path(command).name
    if name not in COMMANDS:
        raise PrefetchError(f"`{command}` is not one of fdfo's commands ({', '.join(COMMANDS)}); write e.g. "
                            "`python -m fdfo.prefetch -- train.py --reward-preset combined`.")
    cls = {"train.py": TrainConfig, "generate.py": GenerateConfig, "metrics.py": MetricsConfig,
           "export.py": ExportConfig}[name]
    cfg = parse(cls, args)
    real = cfg.pretrained_model not in RANDOM_MODELS
    found = Needs(checkpoint=getattr(cfg, "checkpoint", None))
    if found.checkpoint is not None and not found.checkpoint.startswith(("hf:", "http://", "https://")):
        found.checkpoint = None  # a local folder
    if name == "train.py":
        if real:
            terms = [term for term, _ in reward_terms(cfg.reward_preset, cfg.reward)]
            found.hub = [pipeline_files(cfg.pretrained_model), *scorer_files(terms, "reward", cfg.vlm_model_name)]
        found.prompt_files = [cfg.prompt_file]
    elif name == "export.py":
        found.hub = [transformer_files(cfg.pretrained_model)] if cfg.merged and real else []
    elif real:
        found.hub = [pipeline_files(cfg.pretrained_model)]
        if name == "metrics.py":
            from fdfo.evaluation.method_protocol import weights_and_settings
            from fdfo.evaluation.protocol import HPDV2, PROMPT_FILES
            cfg, _ = weights_and_settings(cfg)
            found.hub += [HPDV2] if cfg.prompt_set == "hpdv2" else []
            found.prompt_files = [PROMPT_FILES[cfg.prompt_set]] if cfg.prompt_set in PROMPT_FILES else []
            found.hub += scorer_files([m for m in cfg.metrics if m != "dreamsim_diversity"], "metric",
                                      cfg.vlm_model_name)
            found.dreamsim = "dreamsim_diversity" in cfg.metrics
    found.hub = [files for files in found.hub if not files.is_local]
    found.prompt_files = [p for p in found.prompt_files if Path(p).name in PUBLISHED_PROMPTS]
    return found


def fetch(found: Needs) -> list[tuple[str, int, int]]:
    """Download everything in `found`; returns (what, files, bytes) for each."""
    import torch
    from tqdm import tqdm

    from fdfo.config import project_path
    from fdfo.harness.prompts import PUBLISHED_PROMPTS, download_prompts
    from fdfo.runs.hub import resolve_checkpoint

    fetched = []
    for files in tqdm(found.hub, desc="repos", unit="repo", disable=not found.hub):
        with files.loading():
            names = files.files()
            folder = files.local(names)
        fetched.append(sized(f"{files.repo_id} ({files.what})", [folder / name for name in names]))
    if found.checkpoint is not None:
        folder = resolve_checkpoint(found.checkpoint)
        fetched.append(sized(f"{found.checkpoint} ({folder.name})", folder.rglob("*")))
    for path in found.prompt_files:
        path = project_path(path)
        if not path.exists():
            download_prompts(path, PUBLISHED_PROMPTS[path.name])
        fetched.append(sized(str(path), [path]))
    if found.dreamsim:
        from fdfo.evaluation.protocol import load_dreamsim
        load_dreamsim(torch.device("cpu"))
        cache = Path(torch.hub.get_dir()) / "dreamsim"
        fetched.append(sized(f"DreamSim ({cache})", cache.rglob("*")))
    return fetched


def sized(what: str, paths) -> tuple[str, int, int]:
    """(what, number of files, bytes) of the files among `paths`."""
    files = [p for p in paths if p.is_file()]
    return what, len(files), sum(p.stat().st_size for p in files)


def summary(fetched: list[tuple[str, int, int]]) -> str:
    if not fetched:
        return "Nothing to fetch: this command reads nothing from the network."
    rows = [f"{size / 1e9:9.3f} GB  {count:5d} files  {what}" for what, count, size in fetched]
    total = sum(size for _, _, size in fetched)
    return "\n".join(rows + [f"{total / 1e9:9.3f} GB  in all; set HF_HUB_OFFLINE=1 to run offline from these caches."])


def main(argv: list[str]) -> None:
    argv = argv[1:] if argv[:1] == ["--"] else argv
    if not argv:
        raise PrefetchError("Give the command line to prefetch for, e.g. "
                            "`python -m fdfo.prefetch -- train.py --reward-preset combined`.")
    if hub_constants.is_offline_mode():
        raise PrefetchError("HF_HUB_OFFLINE is set: prefetch downloads, so run it online with HF_HUB_OFFLINE unset.")
    print(summary(fetch(needs(argv[0], argv[1:]))))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
