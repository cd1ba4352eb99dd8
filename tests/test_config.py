import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from fdfo.cli import parse
from fdfo.config import ConfigError, GenerateConfig, MetricsConfig, TrainConfig, to_jsonable
from fdfo.config_files import load_config_file
from fdfo.methods import build_method

CONFIGS = Path(__file__).parent.parent / "configs"


def test_defaults_are_the_papers():
    cfg = TrainConfig()
    assert (cfg.num_epochs, cfg.total_pairs_per_epoch, cfg.gradient_steps_per_epoch) == (1000, 432, 4)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.seed, cfg.save_freq) == (32, 64, 6, 5)
    assert (cfg.reward_preset, cfg.pretrained_model) == ("combined", "stabilityai/stable-diffusion-3.5-medium")
    assert (cfg.sample.num_solver_steps, cfg.sample.guidance_scale, cfg.sample.churn_weight) == (40, 1.0, 0.0025)
    assert cfg.sample.max_sequence_length == 128
    t = cfg.train
    assert (t.learning_rate, t.adam_beta1, t.adam_beta2, t.weight_decay, t.adam_eps) == (3e-5, 0.9, 0.999, 1e-4, 1e-8)
    assert (t.clip_range, t.kl_weight, t.max_grad_norm) == (0.03, 0.0, 1.0)
    assert cfg.default_run_name == "combined-cfg_1p0"


@pytest.mark.parametrize("line", [
    "--num-epochs 5 --total-pairs-per-epoch 16",
    "",
    "--reward-preset pickscore",
    "--log-wandb --resume-from runs/00001-x --save-freq 2 --seed 3 --run-name r --lora-rank 8 --lora-alpha 16 "
    "--max-batch-size 4 --gradient-steps-per-epoch 2 --sample.num-solver-steps 10 --sample.guidance-scale 4.5 "
    "--sample.batch-size 2 --train.learning-rate 1e-4 --train.clip-range 0.05 --train.kl-weight 0.1 "
    "--vlm-model-name qwenvl-3b --pretrained-model sd35m-random --no-memory-efficient --runs-dir /tmp/r",
])
def test_published_train_flags_parse(line, tmp_path, monkeypatch):
    # --resume-from reads the run's settings: a run folder with a checkpoint of the paper's defaults.
    checkpoint = tmp_path / "runs" / "00001-x" / "checkpoints" / "epoch-0000005"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.pt").write_bytes(b"")
    (checkpoint / "settings.json").write_text(json.dumps(to_jsonable(TrainConfig())))
    monkeypatch.chdir(tmp_path)
    cfg = parse(TrainConfig, shlex.split(line))
    if "--seed 3" in line:
        assert (cfg.seed, cfg.sample.guidance_scale, cfg.train.learning_rate, cfg.memory_efficient) == (3, 4.5, 1e-4, False)
        assert (cfg.vlm_model_name, cfg.resume_from, cfg.runs_dir) == ("qwenvl-3b", Path("runs/00001-x"), Path("/tmp/r"))
        assert cfg.default_run_name == "combined-cfg_4p5"


def test_published_generate_and_metrics_flags_parse():
    gen = parse(GenerateConfig, shlex.split("--checkpoint hf:nvidia/x/y --out out.jpg"))
    assert (gen.checkpoint, gen.out) == ("hf:nvidia/x/y", Path("out.jpg"))
    m = parse(MetricsConfig, shlex.split(
        "--checkpoint c --prompt-set hpdv2 --num-prompts 3200 --num-repeats 4 "
        "--metrics hpsv2 clip_h14 clip_l14 dreamsim_diversity"))
    assert m.metrics == ("hpsv2", "clip_h14", "clip_l14", "dreamsim_diversity") and m.num_repeats == 4


def test_unknown_choice_lists_valid_ones(capsys):
    with pytest.raises(SystemExit):
        parse(TrainConfig, ["--reward-preset", "aesthetics"])
    err = capsys.readouterr().err
    assert "pickscore" in err and "vlm_alignment" in err


@pytest.mark.parametrize("name", ["pickscore", "vlm_alignment", "combined_no_cfg", "combined_cfg"])
def test_config_files_load_and_flags_win(name):
    path = CONFIGS / f"{name}.toml"
    from_file = load_config_file(TrainConfig, path)
    assert from_file.reward_preset == name.removesuffix("_no_cfg").removesuffix("_cfg")
    assert from_file.sample.guidance_scale == (4.5 if name == "combined_cfg" else 1.0)
    cli = parse(TrainConfig, ["--config", str(path), "--seed", "11"])
    assert cli == dataclasses.replace(from_file, seed=11)
    if name == "combined_cfg":
        assert parse(TrainConfig, ["--config", str(path), "--sample.guidance-scale", "2"]).sample.guidance_scale == 2


def test_config_file_with_unknown_key_fails_clearly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('reward_preset = "pickscore"\n[sample]\nnum_steps = 3\n')
    with pytest.raises(ConfigError, match=r"unknown setting `num_steps`; valid settings are: .*num_solver_steps"):
        load_config_file(TrainConfig, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(TrainConfig, tmp_path / "missing.toml")


def test_resolved_config_is_json():
    from fdfo.config import to_jsonable
    cfg = parse(TrainConfig, ["--config", str(CONFIGS / "combined_cfg.toml")])
    data = json.loads(json.dumps(to_jsonable(cfg)))
    assert data["sample"]["guidance_scale"] == 4.5 and data["config"].endswith("combined_cfg.toml")


def test_a_method_brings_its_published_recipe_and_flags_still_win(tmp_path):
    grpo = parse(TrainConfig, ["--method", "flow_grpo"])
    assert (grpo.total_pairs_per_epoch, grpo.gradient_steps_per_epoch, grpo.sample.num_solver_steps,
            grpo.sample.guidance_scale, grpo.train.learning_rate) == (576, 2, 10, 4.5, 3e-4)
    assert (grpo.grpo.group_size, grpo.grpo.clip_range, grpo.grpo.kl_weight, build_method(grpo).items_per_sample) == (24, 1e-4, 0.01, 9)
    assert grpo.default_run_name == "flow_grpo-combined-cfg_4p5"
    nft = parse(TrainConfig, ["--method", "diffusion_nft", "--train.learning-rate", "1e-4"])
    assert (nft.gradient_steps_per_epoch, nft.sample.guidance_scale, nft.train.learning_rate) == (1, 1.0, 1e-4)
    (tmp_path / "nft.toml").write_text('method = "diffusion_nft"\n')  # from a config file too
    assert parse(TrainConfig, ["--config", str(tmp_path / "nft.toml")]).sample.num_solver_steps == 10
    fdfo = parse(TrainConfig, [])
    assert (fdfo.method, fdfo.total_pairs_per_epoch, fdfo.sample.num_solver_steps, build_method(fdfo).items_per_sample) == (
        "fdfo", 432, 40, 40)


def test_the_method_recipes_are_the_published_defaults():
    from fdfo.formulas import diffusion_nft, flow_grpo
    for method, published, own in [("flow_grpo", flow_grpo.DEFAULTS, "grpo"), ("diffusion_nft", diffusion_nft.DEFAULTS, "nft")]:
        cfg = parse(TrainConfig, ["--method", method])
        assert (2 * cfg.total_pairs_per_epoch, cfg.sample.num_solver_steps, cfg.sample.guidance_scale,
                cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.adam_eps, cfg.train.max_grad_norm,
                (cfg.train.adam_beta1, cfg.train.adam_beta2), cfg.lora_rank, cfg.lora_alpha) == (
            published["groups_per_epoch"] * published["group_size"], published["num_steps"],
            published["guidance_scale"], published["learning_rate"], published["adam_weight_decay"],
            published["adam_eps"], published["max_grad_norm"], published["adam_betas"], published["lora_rank"],
            published["lora_alpha"]), method
        assert (cfg.ema_decay, cfg.ema_interval, cfg.ema_repeats) == (
            published["ema_decay"], published["ema_interval"], published["ema_repeats"]), method
        settings = getattr(cfg, own)
        for name in ("group_size", "adv_clip_max", "global_std", "timestep_fraction"):
            assert getattr(settings, name) == published[name], (method, name)
    grpo = parse(TrainConfig, ["--method", "flow_grpo"])
    assert (grpo.grpo.noise_level, grpo.grpo.clip_range, grpo.grpo.kl_weight) == (
        flow_grpo.DEFAULTS["noise_level"], flow_grpo.DEFAULTS["clip_range"], flow_grpo.DEFAULTS["kl_beta"])
    # Optimiser steps per epoch: the images over the GPUs' batches, split by the accumulation.
    d = flow_grpo.DEFAULTS
    assert grpo.gradient_steps_per_epoch == d["groups_per_epoch"] * d["group_size"] // (
        d["num_gpus"] * d["sample_batch_size"] * d["gradient_accumulation_steps"])
    nft = parse(TrainConfig, ["--method", "diffusion_nft"])
    assert (nft.nft.beta, nft.nft.kl_weight, nft.nft.decay_type, nft.gradient_steps_per_epoch, nft.nft.solver) == (
        diffusion_nft.DEFAULTS["beta"], diffusion_nft.DEFAULTS["kl_weight"], diffusion_nft.DEFAULTS["decay_type"], 1,
        diffusion_nft.DEFAULTS["solver"])
    assert nft.nft.integer_timesteps  # its pipeline's torch.full(..., sigma * 1000, dtype=torch.long)
