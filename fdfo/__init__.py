"""Finite Difference Flow Optimization: RL post-training of Stable Diffusion 3.5 Medium through a LoRA."""
