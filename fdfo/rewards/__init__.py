"""Rewards as weighted sums of terms; one code path for training and evaluation."""

from fdfo.rewards.engine import PRESETS, Reward, RewardOutput, RewardTerm, build_reward

__all__ = ["PRESETS", "Reward", "RewardOutput", "RewardTerm", "build_reward"]
