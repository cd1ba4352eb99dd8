"""The training methods, one file each, all registered here the same way (the paper's own included)."""

from __future__ import annotations

from fdfo.config import TrainConfig
from fdfo.methods.base import Method
from fdfo.methods.diffusion_nft import DiffusionNft
from fdfo.methods.draft import Draft
from fdfo.methods.fdfo import Fdfo
from fdfo.methods.fdfo_grad import FdfoGrad
from fdfo.methods.flow_grpo import FlowGrpo
from fdfo.methods.rsm import Rsm

METHODS: dict[str, type[Method]] = {"fdfo": Fdfo, "fdfo_grad": FdfoGrad, "flow_grpo": FlowGrpo,
                                    "diffusion_nft": DiffusionNft, "draft": Draft, "rsm": Rsm}


def build_method(cfg: TrainConfig) -> Method:
    """The method `--method` names, with its settings from `cfg`."""
    return METHODS[cfg.method](cfg)
