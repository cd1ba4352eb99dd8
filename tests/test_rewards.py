import json
import typing
from pathlib import Path

import pytest
import torch

from fdfo.config import MetricName
from fdfo.evaluation.protocol import build_metrics
from fdfo.rewards import PRESETS, Reward, RewardTerm, Scorers, build_reward
from fdfo.rewards.clip_score import ClipScore
from fdfo.rewards.registry import RewardSpecError, parse_terms, reward_terms
from fdfo.rewards.twins import qwen_tokenizer, random_clip, random_qwen_vl
from fdfo.rewards import vlm as vlm_module
from fdfo.rewards.vlm import TRAIN_QUESTION, YesNoVlm, single_token
from tests.conftest import torchrun

CPU = torch.device("cpu")
PROMPTS = ["a cat", "an astronaut riding a horse on the moon, oil painting, highly detailed", ""]


def images(n=3, seed=0):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_pickscore_twin_scores_batch_like_one_by_one():
    score = ClipScore(*random_clip(), CPU)
    batch = score(images(), PROMPTS)
    assert batch.shape == (3,) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    single = torch.cat([score(images()[i:i + 1], [p]) for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)


def test_vlm_twin_scores_batch_like_one_by_one():
    vlm = YesNoVlm(*random_qwen_vl(), CPU)
    questions = [TRAIN_QUESTION.format(prompt=p) for p in PROMPTS]  # different lengths: left padding matters
    batch = vlm.score(images(), questions, resize=504)
    assert batch.shape == (3,) and batch.dtype == torch.float32
    assert ((batch > 0) & (batch < 100)).all()
    single = torch.cat([vlm.score(images()[i:i + 1], [q], resize=504) for i, q in enumerate(questions)])
    print(f"VLM batch vs one-by-one: max |difference| = {(batch - single).abs().max():.2e}")
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-4)


def test_packed_window_attention_scores_like_transformers_own(monkeypatch):
    questions = [TRAIN_QUESTION.format(prompt=p) for p in PROMPTS]
    packed_calls = []
    varlen = vlm_module.varlen_attention

    def spy(q, k, v, cu_seqlens, max_len, scale):
        packed_calls.append(len(cu_seqlens) - 1)
        return varlen(q, k, v, cu_seqlens, max_len, scale)
    monkeypatch.setattr(vlm_module, "varlen_attention", spy)
    packed = YesNoVlm(*random_qwen_vl(), CPU).score(images(), questions, resize=504)

    monkeypatch.setattr(vlm_module, "use_packed_window_attention", lambda model: None)
    stock_vlm = YesNoVlm(*random_qwen_vl(), CPU)
    assert stock_vlm.model.config.vision_config._attn_implementation == "sdpa"
    stock = stock_vlm.score(images(), questions, resize=504)
    print(f"VLM packed vs stock vision attention: max |difference| = {(packed - stock).abs().max():.2e}")
    torch.testing.assert_close(packed, stock, rtol=0, atol=1e-4)
    # Every vision layer went through one packed call: windowed layers with many windows, full ones with 3 images.
    depth = stock_vlm.model.config.vision_config.depth
    assert len(packed_calls) == depth and min(packed_calls) == 3 and max(packed_calls) > 3


def test_vlm_sharded_over_two_ranks_equals_one_process(tmp_path):
    out = tmp_path / "scores"
    torchrun(2, Path(__file__).parent / "vlm_shard_worker.py", str(out))
    vlm = YesNoVlm(*random_qwen_vl(), CPU)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"scores.{rank}.json").read_text())
        assert got["sharded"] is True
        expected = vlm.score(images(2, seed=rank), [TRAIN_QUESTION.format(prompt=p) for p in PROMPTS[:2]], 504)
        print(f"rank {rank}: sharded vs single process max |difference| = "
              f"{(torch.tensor(got['scores']) - expected).abs().max():.2e}")
        torch.testing.assert_close(torch.tensor(got["scores"]), expected, rtol=0, atol=1e-5)


def test_vlm_buffers_are_bf16_as_in_the_published_reward(tmp_path):
    # The published trainer wraps the VLM in FSDP1 with MixedPrecision(buffer_dtype=bf16), which rounds the
    # rotary frequencies to bf16. Ours casts the buffers the same way: same scores as FSDP1's, not fp32's.
    torchrun(1, Path(__file__).parent / "vlm_fsdp1_worker.py", str(tmp_path / "fsdp1.json"))
    published = torch.tensor(json.loads((tmp_path / "fsdp1.json").read_text()))
    questions = [TRAIN_QUESTION.format(prompt=p) for p in PROMPTS]
    vlm = YesNoVlm(*random_qwen_vl(), CPU, buffer_dtype=torch.bfloat16)
    assert {b.dtype for b in vlm.model.buffers()} == {torch.bfloat16}
    ours = vlm.score(images(), questions, resize=504)
    exact = YesNoVlm(*random_qwen_vl(), CPU).score(images(), questions, resize=504)
    print(f"tiny VLM: bf16 vs fp32 buffers max |difference| {(ours - exact).abs().max():.2e}, "
          f"ours vs FSDP1 {(ours - published).abs().max():.2e}")
    torch.testing.assert_close(ours, published, rtol=0, atol=1e-5)
    assert (ours - exact).abs().max() > 10 * (ours - published).abs().max()
    reward = build_reward(PRESETS["vlm_alignment"], Scorers(CPU, twins="tiny", purpose="reward"))  # the training reward's default
    torch.testing.assert_close(reward(images(), PROMPTS).total, ours, rtol=0, atol=1e-5)


def test_combined_preset_is_the_weighted_sum_of_its_terms():
    reward = build_reward(PRESETS["combined"], Scorers(CPU, twins="tiny", purpose="reward"))
    out = reward(images(), PROMPTS)
    assert [(t.name, t.weight) for t in reward.terms] == PRESETS["combined"] == [("pickscore", 1.0), ("vlm_alignment", 0.1)]
    torch.testing.assert_close(out.total, out.terms["pickscore"] + 0.1 * out.terms["vlm_alignment"])


def test_long_and_empty_prompts_are_scored():
    reward = build_reward(PRESETS["combined"], Scorers(CPU, twins="tiny", purpose="reward"))
    out = reward(images(2), ["word " * 300, ""])
    assert torch.isfinite(out.total).all()


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="valid presets are: pickscore, vlm_alignment, combined, brightness, compressibility"):
        reward_terms("aesthetic", ())


def test_yes_and_no_must_be_single_tokens():
    tokenizer = qwen_tokenizer()
    assert single_token(tokenizer, "Yes") != single_token(tokenizer, "No")
    with pytest.raises(ValueError, match="splits 'Maybe' into 5 tokens"):
        single_token(tokenizer, "Maybe")


def test_terms_and_weights_from_the_command_line():
    assert parse_terms(("pickscore=1", "hpsv2=0.5", "vlm_alignment=-1e-1", "brightness")) == [
        ("pickscore", 1.0), ("hpsv2", 0.5), ("vlm_alignment", -0.1), ("brightness", 1.0)]
    assert reward_terms("combined", ("clip_l14=2",)) == [("clip_l14", 2.0)]  # --reward replaces the preset
    assert reward_terms("combined", ()) == PRESETS["combined"]


@pytest.mark.parametrize("spec,message", [
    ("aesthetic=1", "Unknown reward term `aesthetic`; known terms are: brightness, compressibility, pickscore, hpsv2, "
                    "clip_h14, clip_l14, image_reward, hpsv3, vlm_alignment, vlm_quality, vlm_photo; or name your own"),
    ("pickscore=high", "the weight `high` is not a finite number"),
    ("pickscore=nan", "the weight `nan` is not a finite number"),
    ("no_such_module_xyz:score=1", "importing `no_such_module_xyz` failed .ModuleNotFoundError"),
    ("fdfo.rewards.brightness:nothing=1", "`fdfo.rewards.brightness` has no function `nothing`"),
    ("fdfo.rewards.brightness:torch=1", r"has no function `torch` \(it is a module\)"),
])
def test_bad_terms_are_refused_with_a_sentence(spec, message):
    with pytest.raises(RewardSpecError, match=message):
        parse_terms((spec,))


def test_a_failing_module_import_says_what_failed(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("import numpy\nraise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardSpecError, match=r"importing `broken_rewards` failed \(RuntimeError: no GPU here\)"):
        parse_terms(("broken_rewards:score=1",))
    with pytest.raises(RewardSpecError, match="more than once"):
        parse_terms(("pickscore=1", "pickscore=2"))


@pytest.mark.parametrize("returned,message", [
    (torch.ones(3, 1), r"returned a torch.float32 tensor of shape \(3, 1\)"),
    (torch.ones(3, dtype=torch.int64), "returned a torch.int64 tensor of shape"),
    ([1.0, 2.0, 3.0], "returned a list"),
])
def test_a_scorer_of_the_wrong_shape_or_dtype_is_named(returned, message):
    reward = Reward([RewardTerm("mine", 1.0, lambda images, prompts: returned)])
    with pytest.raises(RewardSpecError, match=f"`mine` {message}.*shape \\(3,\\): one number per image"):
        reward(images(), PROMPTS)


def test_the_vlm_questions_share_one_vlm_and_park_it_once():
    reward = build_reward([("vlm_alignment", 1.0), ("vlm_quality", 1.0)], Scorers(CPU, twins="tiny", purpose="reward"))
    assert reward.terms[0].scorer.vlm is reward.terms[1].scorer.vlm and len(reward.local_models()) == 1


def test_every_metric_is_a_training_term_from_the_same_registry():
    # Training builds its terms and evaluation its metrics through one Scorers registry: with the same twins,
    # a CLIP-type metric and the term of the same name are the same model; a VLM metric asks the evaluation's
    # question, the training term the published reward's own.
    terms = [name for name in typing.get_args(MetricName) if name != "dreamsim_diversity"]
    reward = build_reward([(name, 1.0) for name in terms], Scorers(CPU, twins="tiny", purpose="reward"))
    out = reward(images(), PROMPTS)
    assert list(out.terms) == terms and all(v.shape == (3,) for v in out.terms.values())
    metrics = {m.name: m.score for m in build_metrics(tuple(terms), CPU, twins="tiny", vlm_model_name="qwenvl-7b")}
    for name in ("pickscore", "hpsv2", "clip_h14", "clip_l14"):
        torch.testing.assert_close(metrics[name](images(), PROMPTS), out.terms[name], rtol=0, atol=1e-5)
    assert len({round(v[0].item(), 3) for k, v in out.terms.items() if k.startswith("clip") or k in ("pickscore", "hpsv2")}) == 4
    assert not torch.allclose(metrics["vlm_alignment"](images(), PROMPTS), out.terms["vlm_alignment"])


def smooth_images(n, size, seed):
    """Decoded images are smooth: a coarse random field, upsampled."""
    coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")


@pytest.mark.parametrize("size", [64, 200])
def test_the_clip_scores_gradient_is_the_finite_difference_of_the_score(size):
    # The processor's resize, crop and normalisation are torch operations (transformers' CLIPImageProcessor):
    # the score is differentiable in the image. Central differences converge to the gradient as h² (measured:
    # relative gap 5.7e-2, 1.8e-3, 2.0e-4, 9.2e-5 at h = 0.1, 0.03, 0.01, 0.003 at 64 px).
    reward = build_reward([("pickscore", 1.0)], Scorers(CPU, twins="tiny", purpose="reward"))
    x = (0.1 + 0.8 * smooth_images(2, size, seed=1)).requires_grad_(True)  # x ± h·direction stays in [0, 1]
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (gradient,) = torch.autograd.grad(reward(x, PROMPTS[:2], differentiable=True).total.sum(), x)
    h = 3e-3
    difference = (reward(x + h * direction, PROMPTS[:2]).total - reward(x - h * direction, PROMPTS[:2]).total).sum() / (2 * h)
    assert (difference - (gradient * direction).sum()).abs() < 2e-3 * (gradient * direction).sum().abs()


def test_the_torch_processor_matches_the_pil_one_on_evaluation_images():
    # transformers < 5 preprocessed with PIL (CLIPImageProcessorPil now); ours is the torch one. On uint8 images,
    # as evaluation scores them, they differ by PIL's rounding of the resized image: measured ≤ 2 levels of 255
    # (0.0300 after normalisation), mean 2.5e-5–3.1e-4 at 64–1024 px; on the tiny twin the scores by 6.8e-4 where
    # they spread by 0.19.
    from transformers import CLIPProcessor
    from transformers.models.clip import CLIPImageProcessorPil
    model, processor = random_clip()
    pil = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    level = 1 / 255 / min(processor.image_processor.image_std)
    for size in (64, 512):
        uint8 = (smooth_images(4, size, seed=size) * 255).round().to(torch.uint8)
        ours, theirs = (p(images=list(uint8), return_tensors="pt")["pixel_values"]
                        for p in (processor.image_processor, pil))
        assert (ours - theirs).abs().max() <= 2.05 * level and (ours - theirs).abs().mean() < 1e-3
    uint8 = (smooth_images(16, 512, seed=0) * 255).round().to(torch.uint8)
    scores = [ClipScore(model, p, CPU)(uint8, ["a cat"] * 16)
              for p in (processor, CLIPProcessor(image_processor=pil, tokenizer=processor.tokenizer))]
    assert (scores[0] - scores[1]).abs().max() < 0.02 * scores[0].std()  # measured: 6.9e-4 where they spread by 0.12
