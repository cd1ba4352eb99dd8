"""Frozen modules that leave the GPU for free: the text encoders and reward models while the LoRA trains."""

from __future__ import annotations

import itertools

import torch


ALIGN = 256  # bytes: every tensor's host copy starts at an offset that suits any dtype and fast copies


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(modules: list[torch.nn.Module]) -> int:
    """Of their parameters and buffers."""
    return tensor_bytes([t for m in modules for t in itertools.chain(m.parameters(), m.buffers())])


class Parking:
    """Keeps a host copy of frozen modules' weights, so that parking them only drops their GPU copy (no transfer:
    the weights never change) and bringing them back is one copy from pinned memory. The host copies share one
    pinned buffer (one allocation is quicker to pin than thousands). The copy is made here, before the run goes on:
    made in a background thread instead, its pinning stalled the GPU work meanwhile by as long as it took
    (docs/performance.md, "Start-up"). Parking nothing (an empty list) is allowed and does nothing; on the CPU the
    host copy is the tensor itself."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device):
        self.device = device
        tensors = list(itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules))
        self.nbytes = tensor_bytes(tensors)
        self.on_device = True
        if device.type != "cuda":
            self.tensors = [(t, t.detach()) for t in tensors]
            return
        sizes = [-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors]
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
        offsets = itertools.accumulate(sizes, initial=0)
        self.tensors = [(t, buffer[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t))
                        for t, o in zip(tensors, offsets)]

    def to_device(self) -> None:
        if self.on_device:  # already there (before the first park): no copy
            return
        for tensor, host in self.tensors:
            tensor.data = host.to(self.device, non_blocking=True)
        self.on_device = True

    def park(self) -> None:
        for tensor, host in self.tensors:
            tensor.data = host
        self.on_device = False
