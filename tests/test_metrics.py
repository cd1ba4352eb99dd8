import json

import numpy as np
import pytest
import torch

from fdfo.cli import parse
from fdfo.config import ConfigError, MetricsConfig
from fdfo.evaluation.protocol import (DINO_COMMIT, diversity, image_seed, load_dreamsim, rank_prompt_indices, select_prompts,
                             summarise)
from fdfo.evaluation.metrics import evaluate
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


def test_defaults_are_the_published_evaluations():
    cfg = parse(MetricsConfig, [])
    assert (cfg.prompt_set, cfg.num_prompts, cfg.num_repeats, cfg.metrics) == ("hpdv2", 500, 1, ("pickscore",))
    assert cfg.max_sequence_length == 256  # the pipeline's default; training's prompts stay at 128


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
        return torch.hub.load("facebookresearch/dino:main", "dino_vitb16"), cache_dir
    monkeypatch.setattr("dreamsim.dreamsim", fake_dreamsim)
    model, cache = load_dreamsim(torch.device("cpu"))
    assert fetched == [(f"facebookresearch/dino:{DINO_COMMIT}", "dino_vitb16", {"trust_repo": True})]
    assert cache == str(tmp_path / "hub" / "dreamsim")
    assert torch.hub.get_dir() == str(tmp_path / "hub") and torch.hub.load is hub_load
    assert not (tmp_path / "models").exists()
