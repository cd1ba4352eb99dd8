"""torchrun worker for test_rewards: the published training reward's VLM wrapping, FSDP1 with
MixedPrecision(buffer_dtype=bf16) on one rank, scoring the test's images (the reference for our bf16 buffers)."""

import functools
import json
import sys

import torch
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy
from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

from fdfo import distributed
from fdfo.rewards.twins import random_qwen_vl
from fdfo.rewards.vlm import TRAIN_QUESTION, YesNoVlm
from tests.test_rewards import PROMPTS, images

device = distributed.init()
model, processor = random_qwen_vl()
wrapped = FullyShardedDataParallel(
    model, sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=device,
    mixed_precision=MixedPrecision(param_dtype=torch.float32, buffer_dtype=torch.bfloat16),
    auto_wrap_policy=functools.partial(size_based_auto_wrap_policy, min_num_params=100))  # the tiny twin's blocks
scores = YesNoVlm(wrapped, processor, device).score(images(), [TRAIN_QUESTION.format(prompt=p) for p in PROMPTS], 504)
with open(sys.argv[1], "w") as f:
    json.dump(scores.tolist(), f)
distributed.shutdown()
