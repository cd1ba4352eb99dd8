"""Rewards as weighted sums of terms; one registry of scorers for training and evaluation."""

from fdfo.rewards.engine import Reward, RewardOutput, RewardTerm, build_reward
from fdfo.rewards.registry import PRESETS, Scorers, reward_terms, twins_for

__all__ = ["PRESETS", "Reward", "RewardOutput", "RewardTerm", "Scorers", "build_reward", "reward_terms", "twins_for"]
