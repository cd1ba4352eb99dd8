import pytest

from fdfo.batching import plan_batches
from fdfo.config import ConfigError

# (world size, total pairs) -> (pairs/rank, sample batch, batches, samples/step, micro-batch, accumulation),
# worked out by hand from the rules: max batch 6 below 8 ranks else 13; pairs/rank rounded down to a
# multiple of 4/gcd(2,4) = 2; largest divisor ≤ max batch.
HAND_COMPUTED = {
    (1, 432): (432, 6, 72, 216, 6, 36),
    (2, 432): (216, 6, 36, 108, 6, 18),
    (4, 432): (108, 6, 18, 54, 6, 9),  # the paper's example
    (8, 432): (54, 9, 6, 27, 9, 3),  # the paper's example
    (16, 432): (26, 13, 2, 13, 13, 1),  # 27 rounded down to 26
    (24, 432): (18, 9, 2, 9, 9, 1),
    (32, 432): (12, 12, 1, 6, 6, 1),  # 13 rounded down to 12
    (1, 16): (16, 4, 4, 8, 4, 2),  # the published single-GPU sanity run
}


@pytest.mark.parametrize("world_size,total", list(HAND_COMPUTED))
def test_plan_matches_hand_computation(world_size, total):
    plan = plan_batches(total, world_size)
    got = (plan.pairs_per_rank, plan.sample_batch_size, plan.num_sample_batches, plan.samples_per_step,
           plan.train_batch_size, plan.gradient_accumulation_steps)
    assert got == HAND_COMPUTED[world_size, total]
    # Every trajectory of the rank is trained on exactly once per epoch.
    assert plan.gradient_steps_per_epoch * plan.gradient_accumulation_steps * plan.train_batch_size == 2 * plan.pairs_per_rank


def test_explicit_sizes_win():
    plan = plan_batches(432, 4, sample_batch_size=4, train_batch_size=3, max_batch_size=2)
    assert (plan.sample_batch_size, plan.num_sample_batches) == (4, 27)
    assert (plan.train_batch_size, plan.gradient_accumulation_steps) == (3, 18)


def test_odd_gradient_steps_round_to_their_granule():
    plan = plan_batches(100, 1, gradient_steps_per_epoch=3)  # 2·pairs must split into 3 steps
    assert plan.pairs_per_rank == 99 and plan.samples_per_step == 66


def test_too_few_pairs_names_the_flag():
    with pytest.raises(ConfigError, match="raise --total-pairs-per-epoch to at least 16"):
        plan_batches(12, 8)


@pytest.mark.parametrize("kwargs,flag", [
    (dict(sample_batch_size=5), "--sample.batch-size 5"),
    (dict(train_batch_size=7), "--train.batch-size 7"),
    (dict(max_batch_size=0), "--max-batch-size"),
    (dict(gradient_steps_per_epoch=0), "--gradient-steps-per-epoch"),
])
def test_impossible_sizes_are_refused(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        plan_batches(432, 4, **kwargs)
