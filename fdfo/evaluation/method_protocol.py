"""Each method's published evaluation protocol, so that a checkpoint's numbers compare with its paper's.

metrics.py and generate.py evaluate a checkpoint with the protocol of the method that trained it (read from its
settings.json; a checkpoint without one, e.g. a published FDFO checkpoint, is FDFO's) unless --protocol names
another; a setting given on the command line or in --config wins over the protocol's, and what was used is printed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from fdfo import distributed
from fdfo.config import ConfigError
from fdfo.model.lora_folder import check_lora_folder
from fdfo.runs.checkpoint import SETTINGS_FILE
from fdfo.runs.ema import EMA_FOLDER, ema_folder
from fdfo.runs.hub import resolve_checkpoint


@dataclass(frozen=True)
class Protocol:
    source: str  # where the published code evaluates
    prompt_set: str
    num_prompts: int
    num_solver_steps: int  # Euler steps of the ODE
    guidance_scale: float
    max_sequence_length: int  # T5 tokens of the prompt
    ema: bool  # the EMA of the LoRA weights, where the checkpoint holds one
    integer_timesteps: bool  # the transformer sees ⌊1000σ⌋ as an integer


PROTOCOLS = {
    # The FDFO paper's evaluation (SPEC): HPDv2's prompts, the plain pipeline at its defaults, no EMA.
    "fdfo": Protocol("the FDFO paper", "hpdv2", 500, 40, 1.0, 256, ema=False, integer_timesteps=False),
    # scripts/train_sd3.py eval(): its test split (dataset/pickscore/test.txt), 40 ODE steps (noise_level 0) at the
    # recipe's CFG, 128 T5 tokens, the EMA's weights swapped in.
    "flow_grpo": Protocol("Flow-GRPO's scripts/train_sd3.py eval()", "pickscore_test", 2048, 40, 4.5, 128, ema=True,
                          integer_timesteps=False),
    # scripts/train_nft_sd3.py eval_fn(): the same, without CFG, through its pipeline's integer timesteps.
    "diffusion_nft": Protocol("DiffusionNFT's scripts/train_nft_sd3.py eval_fn()", "pickscore_test", 2048, 40, 1.0,
                              128, ema=True, integer_timesteps=True),
}
# Methods without a published evaluation of their own in SD3.5-M's PickScore setting are evaluated as FDFO is:
# DRaFT (no official code), the paper's gradient ablations, RSM (its published evaluation is GenEval's detector).
PROTOCOL_OF_METHOD = {"flow_grpo": "flow_grpo", "diffusion_nft": "diffusion_nft"}


def checkpoint_method(checkpoint: Path | None) -> str:
    """The method that trained `checkpoint` (its settings.json); fdfo for the base model or a folder without one."""
    if checkpoint is None or not (Path(checkpoint) / SETTINGS_FILE).is_file():
        return "fdfo"
    try:
        return json.loads((Path(checkpoint) / SETTINGS_FILE).read_text()).get("method", "fdfo")
    except ValueError:
        raise ConfigError(f"{Path(checkpoint) / SETTINGS_FILE} is not JSON: the checkpoint's settings are damaged. "
                          "Give --protocol to say how to evaluate it.") from None


def apply_protocol(cfg, checkpoint: Path | None):
    """`cfg` (MetricsConfig or GenerateConfig) with the protocol's value wherever a setting is None and the protocol
    used as its `protocol`, and whether to use the EMA weights; prints which protocol, from where, and what the
    command line changed."""
    method = checkpoint_method(checkpoint)
    name = cfg.protocol if cfg.protocol != "auto" else PROTOCOL_OF_METHOD.get(method, "fdfo")
    protocol = PROTOCOLS[name]
    fields = [f.name for f in dataclasses.fields(Protocol) if f.name not in ("source", "ema") and hasattr(cfg, f.name)]
    given = {f: getattr(cfg, f) for f in fields if getattr(cfg, f) is not None}
    cfg = dataclasses.replace(cfg, protocol=name, **{f: getattr(protocol, f) for f in fields if f not in given})
    has_ema = checkpoint is not None and (Path(checkpoint) / EMA_FOLDER).is_dir()
    use_ema = cfg.ema or (protocol.ema and has_ema and not cfg.own_weights)
    why = f"the checkpoint's method, {method}" if name == PROTOCOL_OF_METHOD.get(method, "fdfo") else "--protocol"
    settings = ", ".join(f"{f} {getattr(cfg, f)}" for f in fields)
    weights = ("base model" if checkpoint is None else "EMA weights" if use_ema else
               "own weights (it holds no EMA)" if protocol.ema and not has_ema else "own weights")
    distributed.print0(f"Evaluating with {name}'s protocol ({protocol.source}; {why}): {settings}, {weights}."
                       + (f" Given here: {', '.join(f'{k} {v}' for k, v in given.items())}." if given else ""))
    return cfg, use_ema


def weights_and_settings(cfg):
    """(`cfg` under its protocol, the adapter folder to load: the checkpoint's LoRA or its EMA; None = base model)."""
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    cfg, use_ema = apply_protocol(cfg, checkpoint)
    folder = ema_folder(checkpoint) if use_ema else checkpoint
    if folder is not None:
        check_lora_folder(folder)  # a damaged or foreign adapter is refused before the base model loads
    return cfg, folder
