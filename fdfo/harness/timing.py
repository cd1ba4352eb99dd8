"""Wall time, and peak GPU memory on CUDA, accumulated per named phase of an epoch."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.device, self.seconds, self.peak_gib = device, {}, {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.peak_gib[phase] = max(self.peak_gib.get(phase, 0.0), peak)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def elapsed(self) -> float:
        """Seconds since the timer was made (the epoch's wall time)."""
        return time.perf_counter() - self.start
