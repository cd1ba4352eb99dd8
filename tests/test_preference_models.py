"""ImageReward and HPSv3 on their tiny twins: the published scoring formulas by hand, their preprocessing, the
published file layouts, and both as training terms and metrics. The scores against the packages' own code, on
the same weights: bench/reward_models_side_by_side.py."""

import json

import pytest
import torch

from fdfo.cli import parse, parse_train_config
from fdfo.config import MetricsConfig
from fdfo.evaluation.metrics import evaluate
from fdfo.harness.training_loop import train
from fdfo.rewards.hpsv3 import PIXELS, PROMPT, REWARD_TOKEN, Hpsv3Score, smart_resize
from fdfo.rewards.image_reward import (MEAN, STD, ImageRewardError, ImageRewardScore, load_published,
                                       published_weights)
from fdfo.rewards.registry import RewardSpecError, check_differentiable
from fdfo.rewards.twins import random_hpsv3, random_image_reward
from tests.test_rewards import smooth_images

CPU = torch.device("cpu")
PROMPTS = ["a cat", "an astronaut riding a horse on the moon, oil painting, highly detailed"]


@pytest.fixture(scope="module")
def image_reward():
    model, tokenizer, med_config = random_image_reward()
    return ImageRewardScore(model, tokenizer, CPU), med_config


def test_image_rewards_head_is_five_linear_layers_without_activations_then_normalised(image_reward):
    score, _ = image_reward
    states = []
    score.model.head.register_forward_hook(lambda module, args, out: states.append(args[0]))
    x = smooth_images(2, 64, seed=0)
    reward = score(x, PROMPTS)
    # No activation between the layers: the head is one affine map, W5·…·W1 s + b.
    layers = list(score.model.head)
    weight, bias = layers[0].weight, layers[0].bias
    for layer in layers[1:]:
        weight, bias = layer.weight @ weight, layer.weight @ bias + layer.bias
    by_hand = ((states[0] @ weight.T + bias).squeeze(-1) - MEAN) / STD
    torch.testing.assert_close(reward, by_hand, rtol=0, atol=1e-5)


def test_image_reward_loads_the_published_file_layout_and_refuses_a_foreign_one(image_reward):
    score, med_config = image_reward
    weights = published_weights(score.model)
    assert "blip.visual_encoder.blocks.1.attn.qkv.weight" in weights and "mlp.layers.7.bias" in weights
    assert "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight" in weights
    reloaded = ImageRewardScore(load_published(weights, med_config), score.tokenizer, CPU)
    x = smooth_images(2, 64, seed=1)
    torch.testing.assert_close(reloaded(x, PROMPTS), score(x, PROMPTS), rtol=0, atol=0)
    with pytest.raises(ImageRewardError, match="holds `blip.something_else`"):
        load_published({**weights, "blip.something_else": torch.zeros(1)}, med_config)


def test_image_reward_is_differentiable_and_its_torch_resize_is_pils_within_rounding(image_reward):
    score, _ = image_reward
    x = smooth_images(2, 512, seed=2)
    uint8 = (x * 255).round().to(torch.uint8)
    # Evaluation (uint8) resizes with PIL as the package does; training (float) with torchvision's antialiased
    # bicubic. Measured on smooth 512 px images: ≤ 1.5 levels of 255 apart after normalisation.
    level = 1 / 255 / 0.26130258
    assert (score.pixels(uint8) - score.pixels(uint8.float() / 255)).abs().max() < 2 * level
    x = (0.1 + 0.8 * smooth_images(2, 64, seed=3)).requires_grad_(True)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    (gradient,) = torch.autograd.grad(score(x, PROMPTS).sum(), x)
    # Central differences converge as h² (measured relative gap 0.23, 0.029, 0.0035 at h = 0.1, 0.03, 0.01; below,
    # float32 rounding: 0.006 at 0.003).
    h = 1e-2
    difference = (score(x + h * direction, PROMPTS) - score(x - h * direction, PROMPTS)).sum() / (2 * h)
    assert (difference - (gradient * direction).sum()).abs() < 1e-2 * (gradient * direction).sum().abs()


@pytest.fixture(scope="module")
def hpsv3():
    return Hpsv3Score(*random_hpsv3(), CPU)


def test_hpsv3_sizes_as_the_package_does():
    # 256 · 28² pixels, multiples of 28, the aspect kept: 512² → 448² (by hand: 512 / √(512² / 200704) = 448).
    assert smart_resize(512, 512) == (448, 448) and 448 * 448 == PIXELS
    # 768 × 1024: β = √(768 · 1024 / 200704) = 1.9795; 768 / β = 388.0 → ⌊13.86⌋ · 28; 1024 / β = 517.3 → ⌊18.48⌋ · 28.
    assert smart_resize(768, 1024) == (364, 504)
    assert PROMPT.count("{text_prompt}") == 1 and PROMPT.endswith(f"{REWARD_TOKEN}\n\nEND\n")


def test_hpsv3_reads_mu_at_the_reward_token_and_batches_like_one_by_one(hpsv3):
    hidden = []
    hpsv3.model.rm_head.register_forward_hook(lambda module, args, out: hidden.append((args[0], out)))
    x = smooth_images(2, 64, seed=5)
    batch = hpsv3(x, PROMPTS)  # prompts of different lengths: right padding, the reward token found per row
    (state, out), = hidden
    assert state.shape == (2, hpsv3.model.config.text_config.hidden_size) and out.shape == (2, 2)
    torch.testing.assert_close(batch, out[:, 0], rtol=0, atol=0)  # μ; σ is the second output
    single = torch.cat([hpsv3(x[i:i + 1], [p]) for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)
    assert hpsv3.processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN) == hpsv3.reward_token_id


def test_hpsv3_is_refused_where_the_method_back_propagates_the_reward():
    with pytest.raises(RewardSpecError, match="`hpsv3` has no gradient"):
        check_differentiable([("hpsv3", 1.0)], "draft")
    check_differentiable([("image_reward", 1.0)], "draft")


def test_both_train_the_tiny_model_as_terms_and_score_as_metrics(tmp_path):
    run = train(parse_train_config(["--pretrained-model", "tiny", "--reward", "image_reward=1", "hpsv3=0.5",
                                    "--num-epochs", "2", "--total-pairs-per-epoch", "4", "--sample.num-solver-steps",
                                    "2", "--runs-dir", str(tmp_path)]))
    epochs = [row for row in map(json.loads, (run / "training_log.jsonl").read_text().splitlines())
              if row["kind"] == "epoch"]
    assert len(epochs) == 2 and all("reward_image_reward" in e and "reward_hpsv3" in e for e in epochs)
    for e in epochs:  # the total is the weighted sum of the terms
        assert e["reward_mean"] == pytest.approx(e["reward_image_reward"] + 0.5 * e["reward_hpsv3"], abs=1e-5)
    report = evaluate(parse(MetricsConfig, ["--pretrained-model", "tiny", "--metrics", "image_reward", "hpsv3",
                                            "--num-prompts", "3", "--num-solver-steps", "2"]))
    assert {name: r["count"] for name, r in report["results"].items()} == {"image_reward": 3, "hpsv3": 3}
