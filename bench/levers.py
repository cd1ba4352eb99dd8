"""Candidate speed levers for the two hot paths of training, each against the default, with numerics (GPU).

python bench/levers.py --out bench/results/levers-h200.json [--variants default,flash,cudagraphs]
python bench/levers.py --tiny --out /tmp/levers-tiny.json --variants default,whole_model   # the plumbing, on the CPU

SD3.5-M transformer with random weights and a LoRA (B ≠ 0), 512 px (latents 16×64×64), 205 text tokens, the fp16
recipe (fp16 autocast over bf16 weights, fp32 LoRA, gradient scaler), inputs as in bench/profile_step.py. Two hot
paths: a sampling call (no-grad velocity of 12 rows and of 32 rows, 32 being the default 16 pairs per call) and a
training micro-batch of 12 items (forward, the surrogate loss, scaled backward).

Each variant in turn, in one process: its settings and compiled modules; per path the first call (compile
included, "compile_s"), `--warmups` more, then the median of `--repeats` calls with a synchronisation around each,
and the path's `torch.cuda.max_memory_allocated` peak; then plain eager again and `torch._dynamo.reset()`.
Numerics against `default` on the same inputs and weights: relative norm of the velocity difference and
max |v − v_default| / max |v_default| per sampling path, relative norm of the difference of the flattened LoRA
gradient after one micro-batch. `default`'s own numerics compare a second evaluation with its first (the floor
from run-to-run nondeterminism). The fp16 default is itself 1.5e-3 (velocity relative norm) from fp32
(docs/performance.md, precision section): variants past 2e-3 are flagged.

`default` always runs first (the reference). A failing variant keeps its error and what it measured before, and
the others go on; the JSON is rewritten after each variant, so a run cut short keeps what it had. A variant whose
Inductor settings are unknown to, or already the defaults of, the installed torch is skipped with the reason.
Compiling is most of the time (`whole_model` and `max_autotune` compile the most, and come last), so split the
variants over calls with `--variants` where a call's time is limited, e.g.
    --variants default,cudnn,flash,efficient,cudagraphs,cudagraphs_whole,default_repeat
    --variants default,aggressive_fusion,coordinate_descent,whole_model,default_repeat
    --variants default,max_autotune,default_repeat
`--tiny`: the tiny random model in fp32 on the CPU (no autocast, no scaler); variants that need CUDA are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.numerics import sd35m_with_lora  # noqa: E402
from fdfo.formulas.estimator import normalise, surrogate_loss  # noqa: E402
from fdfo.model.compile import compile_blocks  # noqa: E402
from fdfo.model.lora import attach_lora  # noqa: E402
from fdfo.model.backbone import PromptEmbeds  # noqa: E402
from fdfo.model.sd3 import predict_velocity  # noqa: E402
from fdfo.model.tiny import random_pipeline  # noqa: E402

SAMPLING_ROWS = (12, 32)
TRAINING_ITEMS = 12
TEXT_TOKENS = 205
LATENT_SIDE = 64  # 512 px
VELOCITY_FLAG = 2e-3  # relative norm; the default's own distance to fp32 is 1.5e-3
DEFAULT_VS_FP32 = 1.5e-3


@dataclass(frozen=True)
class Variant:
    what: str
    inductor: dict = field(default_factory=dict)  # Inductor config in force while the variant compiles and runs
    attention: SDPBackend | None = None  # the one SDPA backend allowed; None: PyTorch's choice
    whole_model: bool = False  # torch.compile of the whole transformer instead of compile_blocks
    sampling_only: bool = False
    needs_cuda: bool = False


# A compile mode is a set of Inductor options; set as config for the variant's lifetime, compile_blocks serves them all.
mode_options = torch._inductor.list_mode_options

# Cheap to compile first, slow last: a run cut short by a time limit keeps the most rows.
VARIANTS = {
    "default": Variant("compile_blocks, PyTorch's SDPA choice (cuDNN on Hopper): what training does"),
    "cudnn": Variant("SDPA forced to CUDNN_ATTENTION", attention=SDPBackend.CUDNN_ATTENTION, needs_cuda=True),
    "flash": Variant("SDPA forced to FLASH_ATTENTION", attention=SDPBackend.FLASH_ATTENTION, needs_cuda=True),
    "efficient": Variant("SDPA forced to EFFICIENT_ATTENTION", attention=SDPBackend.EFFICIENT_ATTENTION,
                         needs_cuda=True),
    "cudagraphs": Variant("blocks in mode reduce-overhead (CUDA graph trees); sampling only",
                          mode_options("reduce-overhead"), sampling_only=True, needs_cuda=True),
    "cudagraphs_whole": Variant("whole transformer in mode reduce-overhead; sampling only",
                                mode_options("reduce-overhead"), whole_model=True, sampling_only=True, needs_cuda=True),
    "epilogue_fusion": Variant("+ epilogue fusion", {"epilogue_fusion": True}),
    "aggressive_fusion": Variant("+ aggressive fusion", {"aggressive_fusion": True}),
    "coordinate_descent": Variant("+ coordinate-descent tuning of the Triton kernels' launch configs",
                                  {"coordinate_descent_tuning": True}),
    "whole_model": Variant("torch.compile of the whole transformer (fullgraph=False) instead of each block",
                           whole_model=True),
    "max_autotune": Variant("blocks in mode max-autotune-no-cudagraphs (GEMM templates autotuned)",
                            mode_options("max-autotune-no-cudagraphs"), needs_cuda=True),
    # The default again, last: what running first (a cold GPU, first-call autotuning) did to the reference's times.
    "default_repeat": Variant("the default again, after the others"),
}


@dataclass
class Setup:
    device: torch.device
    transformer: torch.nn.Module  # the bare transformer, LoRA injected (what training calls)
    lora: torch.nn.Module
    scaler: torch.amp.GradScaler
    sampling: dict[str, Callable[[], torch.Tensor]]  # path name → a call returning the velocity
    training: Callable[[], None]
    warmups: int
    repeats: int


def tiny_with_lora():
    """The tiny random transformer with a LoRA whose B is non-zero, as `sd35m_with_lora` builds the large one."""
    transformer = random_pipeline("tiny").transformer
    lora = attach_lora(transformer)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    return transformer, lora


def text_conditioning(rows: int, config, dtype: torch.dtype, device: torch.device) -> PromptEmbeds:
    return PromptEmbeds(torch.randn(rows, TEXT_TOKENS, config.joint_attention_dim, device=device, dtype=dtype),
                        torch.randn(rows, config.pooled_projection_dim, device=device, dtype=dtype))


def sampling_call(transformer, rows: int, latent: tuple, dtype: torch.dtype, device: torch.device):
    x = torch.randn(rows, *latent, device=device)
    sigma = torch.tensor(0.6, device=device)
    cond = text_conditioning(rows, transformer.config, dtype, device)

    def call():
        torch.compiler.cudagraph_mark_step_begin()  # each call a new step for CUDA graph trees; a no-op otherwise
        with torch.no_grad():
            return predict_velocity(transformer, x, sigma, cond, 1.0)
    return call


def training_call(transformer, scaler, items: int, latent: tuple, dtype: torch.dtype, device: torch.device):
    x = torch.randn(items, *latent, device=device)
    sigma = torch.rand(items, device=device)
    cond = text_conditioning(items, transformer.config, dtype, device)
    v_ref = torch.randn_like(x)
    d, dR = normalise(0.05 * torch.randn_like(x)), torch.linspace(-0.5, 1, items, device=device)

    def call():
        v = predict_velocity(transformer, x, sigma, cond, 1.0)
        scaler.scale(surrogate_loss(v, v_ref, d, dR, clip_range=0.03).loss).backward()
    return call


def setup(tiny: bool, warmups: int, repeats: int) -> Setup:
    device = torch.device("cpu" if tiny else "cuda")
    transformer, lora = tiny_with_lora() if tiny else sd35m_with_lora(device)
    dtype = torch.float32 if tiny else torch.float16  # fp16 autocast over bf16 weights; fp32 runs without autocast
    side = transformer.config.sample_size if tiny else LATENT_SIDE
    latent = (transformer.config.in_channels, side, side)
    scaler = torch.amp.GradScaler(device.type, enabled=not tiny)
    torch.manual_seed(1)  # the same inputs for every variant
    sampling = {f"sampling_{rows}": sampling_call(transformer, rows, latent, dtype, device) for rows in SAMPLING_ROWS}
    training = training_call(transformer, scaler, TRAINING_ITEMS, latent, dtype, device)
    return Setup(device, transformer, lora, scaler, sampling, training, warmups, repeats)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def elapsed_s(fn, device: torch.device) -> float:
    synchronise(device)
    start = time.perf_counter()
    fn()
    synchronise(device)
    return time.perf_counter() - start


def measured(fn, s: Setup) -> dict:
    """First call (compile included), warm-ups, median of the timed calls, and the path's peak memory."""
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compile_s = elapsed_s(fn, s.device)
    for _ in range(s.warmups):
        fn()
    ms = 1000 * statistics.median(elapsed_s(fn, s.device) for _ in range(s.repeats))
    peak = torch.cuda.max_memory_allocated() / 2**30 if s.device.type == "cuda" else None
    return {"ms": ms, "compile_s": compile_s, "peak_gib": peak}


def skip_reason(variant: Variant, device: torch.device) -> str | None:
    if variant.needs_cuda and device.type != "cuda":
        return "needs CUDA"
    config = torch._inductor.config.get_config_copy()
    unknown = [name for name in variant.inductor if name not in config]
    if unknown:
        return f"torch {torch.__version__} has no Inductor config {unknown}"
    if variant.inductor and all(config[name] == value for name, value in variant.inductor.items()):
        return f"already the default in torch {torch.__version__}: {variant.inductor}"
    return None


@contextlib.contextmanager
def applied(variant: Variant, transformer: torch.nn.Module):
    """The variant's settings and compiled modules for the duration; then plain eager and a fresh Dynamo."""
    compiled = [transformer] if variant.whole_model else list(transformer.transformer_blocks)
    attention = sdpa_kernel([variant.attention]) if variant.attention else contextlib.nullcontext()
    try:
        # The SDPA backend is chosen when a graph is traced: in force before the first (compiling) call.
        with torch._inductor.config.patch(variant.inductor), attention:
            if variant.whole_model:
                transformer.compile(dynamic=False)
            else:
                compile_blocks(list(transformer.transformer_blocks))
            yield
    finally:
        for module in compiled:
            module._compiled_call_impl = None  # what Module.compile set
        torch._dynamo.reset()


def evaluation(s: Setup, sampling_only: bool) -> tuple[dict, torch.Tensor | None]:
    """The velocity of each sampling path, and the (unscaled) LoRA gradient of one micro-batch."""
    velocities = {path: call() for path, call in s.sampling.items()}
    if sampling_only:
        return velocities, None
    s.lora.zero_grad(set_to_none=True)
    s.training()
    grads = [p.grad.flatten() for p in s.lora.parameters() if p.requires_grad]
    return velocities, torch.cat(grads) / s.scaler.get_scale()


def relative_norm(a: torch.Tensor, reference: torch.Tensor) -> float:
    return ((a - reference).norm() / reference.norm()).item()


def numerics(result: tuple, reference: tuple) -> dict:
    (velocities, grads), (ref_velocities, ref_grads) = result, reference
    out = {f"velocity_{path}": {"relative_norm": relative_norm(v, ref_velocities[path]),
                                "max_abs_over_max_abs": ((v - ref_velocities[path]).abs().max()
                                                         / ref_velocities[path].abs().max()).item()}
           for path, v in velocities.items()}
    out["velocity_flagged"] = any(d["relative_norm"] > VELOCITY_FLAG for d in out.values())
    if grads is not None:
        out["lora_gradient_finite"] = bool(torch.isfinite(grads).all())
        out["lora_gradient_relative_norm"] = relative_norm(grads, ref_grads)
    return out


def run_variant(variant: Variant, s: Setup, evaluations: int) -> tuple[dict, list]:
    """The variant's row (settings, per path timings, or why skipped or what failed) and its evaluations."""
    row = {"settings": asdict(variant) | {"attention": getattr(variant.attention, "name", None)}}
    reason = skip_reason(variant, s.device)
    if reason:
        return row | {"skipped": reason}, []
    paths, results = {}, []
    row["paths"] = paths
    calls = dict(s.sampling) if variant.sampling_only else s.sampling | {f"training_{TRAINING_ITEMS}": s.training}
    try:
        with applied(variant, s.transformer):
            for path, call in calls.items():
                paths[path] = measured(call, s)
            results = [evaluation(s, variant.sampling_only) for _ in range(evaluations)]
    except Exception as error:  # one variant's failure (a compile error, out of memory) must not stop the others
        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {error}"[:2000]
    s.lora.zero_grad(set_to_none=True)
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return row, results


def speed_ratios(row: dict, default_row: dict) -> dict:
    """Default's milliseconds over the variant's, per path: above 1 is faster."""
    default_paths = default_row.get("paths", {})
    return {path: default_paths[path]["ms"] / m["ms"] for path, m in row.get("paths", {}).items()
            if path in default_paths}


def cell(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(rows: dict) -> str:
    sampling = [f"sampling_{r}" for r in SAMPLING_ROWS]
    training = f"training_{TRAINING_ITEMS}"
    paths = [*sampling, training]
    head = ["variant", *[f"{p} ms" for p in paths], "× default (" + " / ".join(paths) + ")", "compile s",
            "peak GiB", *[f"Δv rel. norm {p}" for p in sampling], f"max Δv / max v {sampling[-1]}",
            "Δ LoRA grad rel. norm", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, row in rows.items():
        measured_paths, ratios = row.get("paths", {}), row.get("speed_ratio_to_default", {})
        num = row.get("numerics_vs_default", {})
        ms = [cell(measured_paths.get(p, {}).get("ms"), ".1f") for p in paths]
        ratio = " / ".join(cell(ratios.get(p), ".3f") for p in paths)
        compile_s = sum(m["compile_s"] for m in measured_paths.values()) if measured_paths else None
        peaks = [m["peak_gib"] for m in measured_paths.values() if m["peak_gib"] is not None]
        velocity = [num.get(f"velocity_{p}", {}) for p in sampling]
        note = row.get("skipped") or (row["error"].splitlines()[0][:80] + " …" if "error" in row else "")
        note = note.replace("|", "\\|")
        if num.get("velocity_flagged"):
            note = f"⚠ Δv > {VELOCITY_FLAG:g} " + note
        lines.append("| " + " | ".join([name, *ms, ratio, cell(compile_s, ".1f"), cell(max(peaks, default=None), ".1f"),
                                         *[cell(v.get("relative_norm"), ".1e") for v in velocity],
                                         cell(velocity[-1].get("max_abs_over_max_abs"), ".1e"),
                                         cell(num.get("lora_gradient_relative_norm"), ".1e"), note]) + " |")
    return "\n".join(lines)


def variant_names(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; known: {','.join(VARIANTS)}")
    return ["default", *[name for name in names if name != "default"]]  # the reference first, always


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", type=variant_names, default=list(VARIANTS),
                        help=f"comma-separated, default all: {','.join(VARIANTS)}")
    parser.add_argument("--warmups", type=int, default=2, help="calls after the first (compiling) one, untimed")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls; their median is reported")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model in fp32 on the CPU")
    args = parser.parse_args()
    s = setup(args.tiny, args.warmups, args.repeats)
    results = {"device": torch.cuda.get_device_name() if s.device.type == "cuda" else "cpu",
               "torch": torch.__version__, "tiny": args.tiny, "warmups": args.warmups, "repeats": args.repeats,
               "velocity_flag_relative_norm": VELOCITY_FLAG, "default_vs_fp32_velocity_relative_norm": DEFAULT_VS_FP32,
               "variants": {}}
    rows, reference = results["variants"], None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        row, evaluations = run_variant(VARIANTS[name], s, 2 if name == "default" else 1)
        if name == "default" and len(evaluations) == 2:
            reference = evaluations[0]
        rows[name] = row
        if reference is not None and evaluations:
            row["numerics_vs_default"] = numerics(evaluations[-1], reference)
            row["speed_ratio_to_default"] = speed_ratios(row, rows["default"])
        print(name, json.dumps(row), flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nThe fp16 default is {DEFAULT_VS_FP32:g} (velocity relative norm) from fp32 (docs/performance.md, "
          f"precision); variants past {VELOCITY_FLAG:g} from the default are flagged ⚠. The default's numerics: "
          "its second evaluation against its first.\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
