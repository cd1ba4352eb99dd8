import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fdfo.cli import parse
from fdfo.config import ConfigError, MetricsConfig
from fdfo.evaluation.protocol import (DINO_COMMIT, diversity, image_seed, load_dreamsim, rank_prompt_indices, select_prompts,
                             summarise)
from fdfo.evaluation.metrics import evaluate
from fdfo.harness.prompts import PUBLISHED_PROMPTS, PromptFileError, PublishedPrompts, download_prompts
from fdfo.evaluation.method_protocol import apply_protocol
from tests.conftest import ROOT, torchrun

SMALL = ["--pretrained-model", "tiny", "--prompt-set", "pickscore_train", "--num-prompts", "5", "--num-repeats", "2",
         "--num-solver-steps", "2", "--resolution", "32", "--batch-size", "3",
         "--metrics", "pickscore", "vlm_alignment", "dreamsim_diversity"]


def test_seed_formula_and_round_robin_dealing():
    assert image_seed(100, prompt_index=3, num_repeats=4, repeat=2) == 100 + 3 * 4 + 2
    assert rank_prompt_indices(7, 0, 3) == [0, 3, 6] and rank_prompt_indices(7, 2, 3) == [2, 5]
    dealt = sorted(i for r in range(4) for i in rank_prompt_indices(10, r, 4))
    assert dealt == list(range(10))


def test_prompts_are_shuffled_as_published():
    # The published metrics shuffle the list with numpy's legacy RandomState(prompt_seed).shuffle.
    prompts = [f"prompt {i}" for i in range(200)]
    published = list(prompts)
    np.random.RandomState(3).shuffle(published)
    assert select_prompts(prompts, 50, seed=3) == published[:50]
    assert prompts == [f"prompt {i}" for i in range(200)]  # the caller's list is left alone


def checkpoint_of(tmp_path, method: str | None, ema: bool) -> Path:
    """A checkpoint folder as far as the protocol reads it: settings.json naming the method, an ema/ folder."""
    folder = tmp_path / f"{method}-{ema}"
    (folder / "ema" if ema else folder).mkdir(parents=True, exist_ok=True)
    if method is not None:
        (folder / "settings.json").write_text(json.dumps({"method": method}))
    return folder


def test_each_methods_checkpoint_is_evaluated_with_its_published_protocol(tmp_path, capsys):
    base, _ = apply_protocol(parse(MetricsConfig, []), None)  # the base model: the FDFO paper's evaluation
    assert (base.protocol, base.prompt_set, base.num_prompts, base.num_repeats, base.metrics, base.num_solver_steps,
            base.guidance_scale, base.max_sequence_length, base.integer_timesteps) == (
        "fdfo", "hpdv2", 500, 1, ("pickscore",), 40, 1.0, 256, False)
    expected = {"fdfo": ("fdfo", "hpdv2", 500, 1.0, 256, False, False), None: ("fdfo", "hpdv2", 500, 1.0, 256, False, False),
                "draft": ("fdfo", "hpdv2", 500, 1.0, 256, False, False),
                "flow_grpo": ("flow_grpo", "pickscore_test", 2048, 4.5, 128, False, True),
                "diffusion_nft": ("diffusion_nft", "pickscore_test", 2048, 1.0, 128, True, True)}
    for method, (name, prompts, n, guidance, tokens, integer, ema) in expected.items():
        cfg, use_ema = apply_protocol(parse(MetricsConfig, []), checkpoint_of(tmp_path, method, ema=True))
        assert (cfg.protocol, cfg.prompt_set, cfg.num_prompts, cfg.num_solver_steps, cfg.guidance_scale,
                cfg.max_sequence_length, cfg.integer_timesteps, use_ema) == (
            name, prompts, n, 40, guidance, tokens, integer, ema), method
    assert "Evaluating with diffusion_nft's protocol" in capsys.readouterr().out
    grpo = checkpoint_of(tmp_path, "flow_grpo", ema=False)
    # Flags win, one by one; a checkpoint without an EMA is evaluated with its own weights, and says so.
    cfg, use_ema = apply_protocol(parse(MetricsConfig, ["--guidance-scale", "1", "--prompt-set", "hpdv2"]), grpo)
    assert (cfg.guidance_scale, cfg.prompt_set, cfg.num_prompts, cfg.max_sequence_length, use_ema) == (
        1.0, "hpdv2", 2048, 128, False)
    out = capsys.readouterr().out
    assert "own weights (it holds no EMA)" in out and "Given here: prompt_set hpdv2, guidance_scale 1.0" in out
    _, use_ema = apply_protocol(parse(MetricsConfig, ["--own-weights"]), checkpoint_of(tmp_path, "diffusion_nft", True))
    assert not use_ema
    cfg, _ = apply_protocol(parse(MetricsConfig, ["--protocol", "fdfo"]), grpo)
    assert (cfg.protocol, cfg.guidance_scale, cfg.prompt_set) == ("fdfo", 1.0, "hpdv2")
    assert "(the FDFO paper; --protocol)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--ema and --own-weights contradict"):
        evaluate(parse(MetricsConfig, ["--checkpoint", str(grpo), "--ema", "--own-weights"]))


def test_published_prompt_files_download_whole_and_are_checked(tmp_path):
    published = "".join(f"prompt {i}\n" for i in range(3)).encode()
    (tmp_path / "test.txt").write_bytes(published)
    source = PublishedPrompts((tmp_path / "test.txt").as_uri(), hashlib.sha256(published).hexdigest())
    path = tmp_path / "sets" / "pickscore_test.txt"
    download_prompts(path, source)
    assert path.read_bytes() == published and [p.name for p in path.parent.iterdir()] == [path.name]
    (tmp_path / "test.txt").write_bytes(published + b"one more\n")
    with pytest.raises(PromptFileError, match="is not the published one"):
        download_prompts(tmp_path / "other.txt", source)
    assert not (tmp_path / "other.txt").exists()
    with pytest.raises(PromptFileError, match="Without internet, copy that file"):
        download_prompts(tmp_path / "other.txt", PublishedPrompts((tmp_path / "missing.txt").as_uri(), source.sha256))
    for name in ("pickscore_train.txt", "pickscore_test.txt"):  # the same files, where a checkout has them
        shared = ROOT.parent / "shared" / "data" / name
        if shared.is_file():
            assert hashlib.sha256(shared.read_bytes()).hexdigest() == PUBLISHED_PROMPTS[name].sha256


def test_prompt_selection_is_seeded_and_capped():
    prompts = [f"p{i}" for i in range(10)]
    assert select_prompts(prompts, 4, seed=1) == select_prompts(prompts, 4, seed=1)
    assert select_prompts(prompts, 4, seed=1) != select_prompts(prompts, 4, seed=2)
    with pytest.warns(UserWarning, match="more than the set's 10 prompts"):
        assert sorted(select_prompts(prompts, 50, seed=0)) == sorted(prompts)


def test_diversity_formula_by_hand():
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    # pairs: |e0−e1|² = 1, |e0−e2|² = 4, |e1−e2|² = 1 + 4 = 5 → mean 10/3
    assert diversity(e) == pytest.approx(10 / 3)
    rows = [((0, 0), [0.0, 0.0]), ((0, 1), [1.0, 0.0]), ((1, 0), [0.0, 0.0]), ((1, 1), [0.0, 3.0])]
    assert summarise("dreamsim_diversity", rows) == {"mean": pytest.approx(5.0), "std": pytest.approx(4.0), "count": 2}


def test_diversity_needs_two_repeats_before_any_model_loads():
    cfg = parse(MetricsConfig, ["--pretrained-model", "no-such/model", "--metrics", "dreamsim_diversity"])
    with pytest.raises(ConfigError, match="--num-repeats 2 or more"):
        evaluate(cfg)


def test_unknown_metric_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        parse(MetricsConfig, ["--metrics", "fid"])
    assert "dreamsim_diversity" in capsys.readouterr().err


def test_two_ranks_give_the_single_rank_results(tmp_path):
    single = evaluate(parse(MetricsConfig, [*SMALL, "--out", str(tmp_path / "new" / "one.json")]))
    report = json.loads((tmp_path / "new" / "one.json").read_text())
    assert {"config", "checkpoint", "num_prompts", "world_size", "elapsed_s", "results"} <= report.keys()
    assert report["results"]["pickscore"]["count"] == 10 and report["results"]["dreamsim_diversity"]["count"] == 5
    torchrun(2, ROOT / "metrics.py", *SMALL, "--out", str(tmp_path / "two.json"))
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2
    for name, r in single["results"].items():
        assert two["results"][name]["count"] == r["count"]
        assert two["results"][name]["mean"] == pytest.approx(r["mean"], rel=1e-4), name


def test_dreamsim_is_cached_with_torch_and_fetches_pinned_dino_code(tmp_path, monkeypatch):
    # DreamSim runs torch.hub.load("facebookresearch/dino:main", …) and points torch.hub at its cache folder
    # (by default ./models). Ours: the cache under torch's hub folder, the code at one commit, both put back after.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # torch.hub.set_dir, undone after the test
    fetched = []

    def hub_load(repo, model, *args, **kwargs):
        fetched.append((repo, model, kwargs))
        return "dino"
    monkeypatch.setattr(torch.hub, "load", hub_load)

    def fake_dreamsim(pretrained, device, cache_dir):
        torch.hub.set_dir(cache_dir)  # as dreamsim's feature extractor does
        torch.nn.utils.weight_norm(torch.nn.Linear(2, 2))  # as its DINO head does: a FutureWarning
        warnings.warn("Already found a `peft_config` attribute in the model. This will lead to having multiple "
                      "adapters in the model. Make sure to know what you are doing!")  # as PEFT says to it
        return torch.hub.load("facebookresearch/dino:main", "dino_vitb16"), cache_dir
    monkeypatch.setattr("dreamsim.dreamsim", fake_dreamsim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither warning reaches the user
        model, cache = load_dreamsim(torch.device("cpu"))
    assert fetched == [(f"facebookresearch/dino:{DINO_COMMIT}", "dino_vitb16", {"trust_repo": True})]
    assert cache == str(tmp_path / "hub" / "dreamsim")
    assert torch.hub.get_dir() == str(tmp_path / "hub") and torch.hub.load is hub_load
    assert not (tmp_path / "models").exists()
