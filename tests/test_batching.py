import pytest

from fdfo.harness.batching import BatchSizes, plan_batches
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


# (world size, total pairs) -> (pairs per sampling call, items per micro-batch) as executed by default: up to
# 16 pairs and 12 items, divisors of the pairs per rank and of a step's items (samples per step × 40 steps).
EXECUTED = {
    (1, 16): (16, 10),  # 320 items per step: 12 does not divide it
    (1, 48): (16, 12),
    (4, 432): (12, 12),  # 108 pairs per rank: 16 does not divide them
    (8, 432): (9, 12),  # the paper's micro-batch of 9 items, raised
}


@pytest.mark.parametrize("world_size,total", list(EXECUTED))
def test_executed_sizes_raise_the_papers_for_speed(world_size, total):
    plan = plan_batches(total, world_size)
    assert (plan.sampling_batch, plan.micro_batch) == EXECUTED[world_size, total]
    assert plan.sampling_calls * plan.sampling_batch == plan.pairs_per_rank
    assert plan.micro_batches_per_step * plan.micro_batch == plan.samples_per_step * 40


def test_given_sizes_and_caps_are_executed_as_given():
    capped = plan_batches(48, 1, sizes=BatchSizes(max_batch_size=4))
    assert (capped.sampling_batch, capped.micro_batch) == (4, 4)
    plan = plan_batches(48, 1, sizes=BatchSizes(sample_batch_size=3, train_batch_size=8))
    assert (plan.sampling_batch, plan.micro_batch) == (3, 8)
    assert plan_batches(48, 1, sizes=BatchSizes(micro_batch=24)).micro_batch == 24
    with pytest.raises(ConfigError, match="--train.micro-batch 7 must divide the 960"):
        plan_batches(48, 1, sizes=BatchSizes(micro_batch=7))


def test_explicit_sizes_win():
    plan = plan_batches(432, 4, sizes=BatchSizes(sample_batch_size=4, train_batch_size=3, max_batch_size=2))
    assert (plan.sample_batch_size, plan.num_sample_batches) == (4, 27)
    assert (plan.train_batch_size, plan.gradient_accumulation_steps) == (3, 18)


def test_odd_gradient_steps_round_to_their_granule():
    plan = plan_batches(100, 1, gradient_steps_per_epoch=3)  # 2·pairs must split into 3 steps
    assert plan.pairs_per_rank == 99 and plan.samples_per_step == 66


def test_too_few_pairs_names_the_flag():
    with pytest.raises(ConfigError, match="raise --total-pairs-per-epoch to at least 16"):
        plan_batches(12, 8)


@pytest.mark.parametrize("kwargs,flag", [
    (dict(sizes=BatchSizes(sample_batch_size=5)), "--sample.batch-size 5"),
    (dict(sizes=BatchSizes(train_batch_size=7)), "--train.batch-size 7"),
    (dict(sizes=BatchSizes(max_batch_size=0)), "--max-batch-size"),
    (dict(gradient_steps_per_epoch=0), "--gradient-steps-per-epoch"),
])
def test_impossible_sizes_are_refused(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        plan_batches(432, 4, **kwargs)
