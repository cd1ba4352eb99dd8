"""The check of a LoRA folder (PEFT's format: adapter_config.json + adapter_model.safetensors) that every entry
point runs before anything loads: it reads only the JSON and the safetensors header, and names what is damaged
or foreign in a sentence."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from fdfo.errors import UserError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PEFT_PREFIX = "base_model.model."  # what PEFT's wrapper puts before the transformer's own module names
LORA_WEIGHT = re.compile(r"(?P<module>.+)\.lora_(?P<half>[AB])\.weight")  # PEFT's saved key of a LoRA matrix
MAX_RANK = 4096  # far above any useful rank (SD3.5-M's projections are 1536 wide): a larger r is a damaged config


class LoraLoadError(UserError, RuntimeError):
    """A LoRA folder that does not fit the model; nothing was loaded."""


def check_lora_folder(folder: Path) -> None:
    """Refuse a damaged or foreign LoRA folder with a sentence, reading only adapter_config.json and the
    safetensors header (no weights), so that every entry point can say so before the base model loads."""
    folder = Path(folder)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise LoraLoadError(f"{folder} is not a LoRA checkpoint folder: {', '.join(missing)} missing. Give a "
                            f"checkpoint folder holding {' and '.join(ADAPTER_FILES)}, or its run folder.")
    config_file, weights_file = folder / ADAPTER_FILES[0], folder / ADAPTER_FILES[1]
    config = read_adapter_config(config_file)
    pairs: dict[str, dict[str, list[int]]] = {}  # module name → {"A": shape, "B": shape}
    for key, shape in read_weight_shapes(weights_file).items():
        match = LORA_WEIGHT.fullmatch(key)
        module = match["module"].removeprefix(PEFT_PREFIX) if match else ""
        if not (match and targeted(config, module)):
            raise damaged(weights_file, f"holds {key}, which is not the lora_A or lora_B weight of a module that "
                                        f"{config_file.name}'s target_modules names")
        pairs.setdefault(module, {})[match["half"]] = shape
    if not pairs:
        raise damaged(weights_file, "holds no LoRA weights")
    names = config["target_modules"]  # a pattern matches every weight's module by now; each name must match one
    unused = [] if isinstance(names, str) else [n for n in names if not any(named(n, module) for module in pairs)]
    if unused:
        raise damaged(config_file, f"names target_modules that no weight of {weights_file.name} belongs to "
                                   f"({', '.join(unused)})")
    for module, pair in pairs.items():
        if pair.keys() != {"A", "B"}:
            have, lack = sorted(pair)[0], "B" if "A" in pair else "A"
            raise damaged(weights_file, f"holds the lora_{have} of {module} without its lora_{lack}")
        a, b, r = pair["A"], pair["B"], module_rank(config, module)
        if not (len(a) == len(b) == 2 and a[0] == b[1] == r):
            raise damaged(weights_file, f"holds {module}'s lora_A of shape {a} and lora_B of shape {b}, while "
                                        f"{config_file.name} gives rank {r} (lora_A is [r, in], lora_B [out, r])")
        if r > min(a[1], b[0]):
            raise damaged(config_file, f"gives rank {r}, above the width of {module} ({a[1]} in, {b[0]} out)")


def read_adapter_config(path: Path) -> dict[str, Any]:
    """adapter_config.json as a table whose target_modules, r and lora_alpha PEFT can use."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise damaged(path, f"cannot be read ({e.strerror})") from None
    except ValueError as e:  # not UTF-8 or not JSON
        raise damaged(path, f"is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise damaged(path, f"holds a JSON {type(config).__name__}, not a table of settings")
    names = config.get("target_modules")
    if not (isinstance(names, str) and names or isinstance(names, list) and names
            and all(isinstance(n, str) and n for n in names)):
        raise damaged(path, f"gives target_modules {names!r}, not a list of module names or a pattern")
    patterns = config.get("rank_pattern") or {}  # per-module ranks, as PEFT reads them
    if not isinstance(patterns, dict):
        raise damaged(path, f"gives rank_pattern {patterns!r}, not a table of module patterns and their ranks")
    for pattern in [*patterns, *([names] if isinstance(names, str) else [])]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise damaged(path, f"gives {pattern!r} as a module pattern, not a regular expression ({e})") from None
    for setting, rank in [("r", config.get("r")), *((f"rank_pattern[{p!r}]", r) for p, r in patterns.items())]:
        if type(rank) is not int or not 1 <= rank <= MAX_RANK:
            raise damaged(path, f"gives {setting} {rank!r}, not a LoRA rank (a whole number from 1 to {MAX_RANK})")
    alpha = config.get("lora_alpha")
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise damaged(path, f"gives lora_alpha {alpha!r}, not a finite number")
    return config


def read_weight_shapes(path: Path) -> dict[str, list[int]]:
    """The shape of every tensor of a safetensors file, read from its header alone; safetensors checks that the
    header is whole and that its tensors fill the file exactly (a truncated or foreign file is refused)."""
    try:
        with safe_open(str(path), framework="pt") as weights:
            return {key: weights.get_slice(key).get_shape() for key in weights.keys()}
    except (OSError, SafetensorError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise damaged(path, f"cannot be read as safetensors ({detail})") from None


def targeted(config: dict[str, Any], module: str) -> bool:
    """Whether target_modules adapts `module`, as PEFT matches it: a lone string is a pattern of the whole name."""
    names = config["target_modules"]
    return re.fullmatch(names, module) is not None if isinstance(names, str) else any(named(n, module) for n in names)


def named(name: str, module: str) -> bool:
    """Whether an entry of a target_modules list names `module`: its whole name or its last parts."""
    return module == name or module.endswith("." + name)


def module_rank(config: dict[str, Any], module: str) -> int:
    """The rank of `module`'s LoRA: config's rank_pattern (matched as PEFT matches it) where it names the module."""
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return rank
    return config["r"]


def damaged(path: Path, what: str) -> LoraLoadError:
    return LoraLoadError(f"{path} {what}: the LoRA folder is damaged or not a PEFT LoRA; copy it again or pick "
                         "another checkpoint.")
