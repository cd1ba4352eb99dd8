"""--max-memory-gib: the planner's arithmetic by hand, its refusal, and a budgeted run that trains the same LoRA."""

import dataclasses
import json

import pytest
import torch

from fdfo.cli import parse_train_config
from fdfo.config import ConfigError, check_train_config
from fdfo.harness import memory
from fdfo.harness.batching import plan_batches
from fdfo.harness.training_loop import train
from fdfo.model.lora import attach_lora, trainable
from fdfo.model.parking import Parking
from tests.test_train import SMALL, lora_weights

GIB = 2**30
# SD3.5-M at 512 px (1,024 patches + 205 text tokens, 24 blocks of 1,536 channels), 40 stored steps of 16×64×64
# latents, and the sizes of the 22-GiB PickScore sanity run on the H200 (as its printed estimates give them).
SD35M = memory.Shapes(blocks=24, channels=1536, tokens=1229, rows_per_item=1, stored_bytes_per_sample=2 * 40 * 65536 * 4)
SANITY = memory.Sizes(resident=int(5.3 * GIB), optimiser=int(0.21 * GIB), text_encoders=int(10.4 * GIB),
                      reward_models=int(3.67 * GIB), transformer_frozen=int(4.6 * GIB),
                      workspace_sample=int(1.5 * GIB), workspace_train=int(3.4 * GIB))


def test_the_fastest_sizes_that_fit_by_hand():
    plan = plan_batches(16, 1)  # the sanity command: 16 pairs per call, micro-batches of 10 of a step's 320 items
    assert (plan.sampling_batch, plan.micro_batch, plan.micro_batch * plan.micro_batches_per_step) == (16, 10, 320)
    fitted = memory.fit(22, plan, SD35M, SANITY)
    # Usable: 0.9 × 22 = 19.8 GiB. Training holds 5.3 + 0.21 + 0.625 (32 trajectories of 20 MiB) + 3.4 = 9.535 GiB
    # before activations; an item keeps 1229 · 1536 · 24 · 33.8 B = 1.426 GiB plain, so at most 7.2 items fit
    # (micro-batch 5, 23.5 ms per item), or 1229 · 1536 · (24 · 12.5 + 33.8) B = 0.587 GiB checkpointed, 17.5 items,
    # capped at the plan's 10 (16.0 ms × 1.42 = 22.7 ms per item): checkpointing at 10 is faster.
    assert (fitted.plan.sampling_batch, fitted.plan.micro_batch, fitted.plan.activation_checkpointing) == (16, 10, True)
    assert fitted.plan.micro_batches_per_step == 32
    row = 1229 * 1536
    stored = 32 * 2 * 40 * 65536 * 4 / GIB
    assert fitted.peaks_gib["train"] == pytest.approx(5.3 + 0.21 + stored + 3.4 + 10 * row * (24 * 12.5 + 33.8) / GIB,
                                                      rel=1e-6)
    assert fitted.peaks_gib["sample"] == pytest.approx(5.3 + 3.67 + stored + 1.5 + 32 * row * 40 / GIB, rel=1e-6)
    assert fitted.peaks_gib["encode"] == pytest.approx(5.3 + 10.4, rel=1e-6)
    assert all(peak <= 0.9 * 22 for peak in fitted.peaks_gib.values())
    assert memory.item_ms_plain(5) == pytest.approx(23.5) and memory.item_ms_plain(10) == pytest.approx(16.0)


def test_one_rank_of_the_default_4_rank_run_fits_22_gib_with_the_transformer_parked_to_encode():
    # The combined reward on 4 ranks: each holds the VLM's shard and one gathered block (3.9 + 0.5 GiB) besides the
    # transformer, so transformer + text encoders = 9.7 + 10.4 GiB, above the 19.8 usable: the transformer's base
    # weights (4.6 GiB) leave while encoding (encode 15.5 GiB). 108 pairs' trajectories: 4.22 GiB.
    plan = plan_batches(432, 4)
    shard = dataclasses.replace(SANITY, resident=int(9.7 * GIB))
    fitted = memory.fit(22, plan, SD35M, shard)
    assert fitted.transformer_parked_to_encode
    assert fitted.peaks_gib["encode"] == pytest.approx(9.7 - 4.6 + 10.4, rel=1e-6)
    assert (fitted.plan.sampling_batch, fitted.plan.micro_batch, fitted.plan.activation_checkpointing) == (4, 3, True)
    assert all(peak <= 0.9 * 22 for peak in fitted.peaks_gib.values())
    assert not memory.fit(23, plan, SD35M, shard).transformer_parked_to_encode  # 20.1 GiB fits 20.7: no copy needed
    with pytest.raises(ConfigError, match="needs about 22.3 GiB"):  # without that parking, as before
        memory.fit(22, plan, SD35M, dataclasses.replace(shard, transformer_frozen=0))


def test_parking_leaves_what_trains(tiny):
    lora = attach_lora(tiny.transformer, rank=4, alpha=4)
    frozen = [t for t in [*tiny.transformer.parameters(), *tiny.transformer.buffers()] if not t.requires_grad]
    assert trainable(lora) and frozen
    assert Parking([tiny.transformer], torch.device("cpu")).nbytes == \
        sum(t.numel() * t.element_size() for t in frozen)


def test_a_budget_that_fits_the_defaults_changes_nothing():
    plan = plan_batches(16, 1)
    # 36 GiB usable: micro-batch 10 fits plain (23.8 GiB), faster than any checkpointed micro-batch.
    assert memory.fit(40, plan, SD35M, SANITY).plan == plan


def test_a_budget_below_the_models_is_refused_with_what_they_need():
    with pytest.raises(ConfigError, match=r"--max-memory-gib 12 is too small.*text encoders 10\.4.*more GPUs"):
        memory.fit(12, plan_batches(16, 1), SD35M, SANITY)
    with pytest.raises(ConfigError, match="--max-memory-gib must be a positive"):
        check_train_config(parse_train_config(["--max-memory-gib", "-1"]))
    with pytest.raises(ConfigError, match="draft's .* not modelled"):
        check_train_config(parse_train_config(["--method", "draft", "--max-memory-gib", "22"]))


def test_activation_checkpointing_leaves_the_gradient_unchanged(tiny):
    transformer = tiny.transformer
    lora = attach_lora(transformer, rank=4, alpha=4)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    config, generator = transformer.config, torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(3, config.in_channels, 8, 8, generator=generator),
                  timestep=torch.tensor([100.0, 500.0, 900.0]),
                  encoder_hidden_states=torch.randn(3, 7, config.joint_attention_dim, generator=generator),
                  pooled_projections=torch.randn(3, config.pooled_projection_dim, generator=generator))

    def gradient():
        lora.zero_grad()
        transformer(**inputs).sample.square().mean().backward()
        return [p.grad.clone() for p in trainable(lora)]
    plain = gradient()
    transformer.enable_gradient_checkpointing()
    checkpointed = gradient()
    assert any(g.abs().max() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_budgeted_run_trains_the_same_lora(tmp_path):
    # The tiny model's sizes under 0.0025 GiB (measured with its real set-up): one pair per sampling call and
    # checkpointed micro-batches of 2 instead of 8 and 16; the same pairs and gradients up to rounding, so the LoRA
    # agrees with the unbudgeted run as closely as any two batch sizes do (test_train.py): measured 6.2e-5 of the
    # update (2 threads), 2.3e-4 (1 thread, ATEN_CPU_CAPABILITY=avx2).
    flags = [*SMALL, "--reward-preset", "pickscore", "--num-epochs", "1", "--save-freq", "1",
             "--sample.batch-size", "8", "--train.micro-batch", "16"]
    runs = [train(parse_train_config([*flags, "--runs-dir", str(tmp_path / name), *extra]))
            for name, extra in [("plain", []), ("budget", ["--max-memory-gib", "0.0025"])]]
    plans = [json.loads((run / "config.json").read_text())["batch_plan"] for run in runs]
    assert [(p["sampling_batch"], p["micro_batch"], p["activation_checkpointing"]) for p in plans] == \
        [(8, 16, False), (1, 2, True)]
    plain, budget = (lora_weights(run, 1) for run in runs)
    update = sum((v ** 2).sum() for k, v in plain.items() if "lora_B" in k) ** 0.5
    gap = sum(((budget[k] - v) ** 2).sum() for k, v in plain.items() if "lora_B" in k) ** 0.5
    assert gap / update < 2e-3
    with pytest.raises(ConfigError, match="--max-memory-gib 0.002 is too small"):
        train(parse_train_config([*flags, "--runs-dir", str(tmp_path / "small"), "--max-memory-gib", "0.002"]))
    assert not (tmp_path / "small").exists()  # refused before the run folder is made
