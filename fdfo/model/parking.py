"""Frozen modules that leave the GPU for free: the text encoders and reward models while the LoRA trains."""

from __future__ import annotations

import itertools

import torch


ALIGN = 256  # bytes: every tensor's host copy starts at an offset that suits any dtype and fast copies
# Pinned memory as malloc + page-mapping in 8 threads + cudaHostRegister, PyTorch's allocator option for large pins
# (8 threads is its documented choice), instead of one cudaHostAlloc call mapping the pages on one thread.
PINNING = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def frozen_tensors(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    """Their parameters and buffers that need no gradient: what may leave the GPU and come back unchanged."""
    return [t for m in modules for t in itertools.chain(m.parameters(), m.buffers()) if not t.requires_grad]


def module_bytes(modules: list[torch.nn.Module]) -> int:
    """Of their parameters and buffers."""
    return tensor_bytes([t for m in modules for t in itertools.chain(m.parameters(), m.buffers())])


class Parking:
    """Keeps a host copy of modules' frozen weights (a LoRA-wrapped model's base weights: what requires a gradient
    stays, as the optimiser changes it), so that parking them only drops their GPU copy (no transfer:
    the weights never change) and bringing them back is one copy from pinned memory. The host copies share one
    pinned buffer (one allocation is quicker to pin than thousands). The copy is made here, before the run goes on:
    made in a background thread instead, its pinning stalled the GPU work meanwhile by as long as it took
    (docs/performance.md, "Start-up"). Parking nothing (an empty list) is allowed and does nothing; on the CPU the
    host copy is the tensor itself."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device):
        self.device = device
        tensors = frozen_tensors(modules)
        self.nbytes = tensor_bytes(tensors)
        self.on_device = True
        if device.type != "cuda":
            self.tensors = [(t, t.detach()) for t in tensors]
            return
        torch._C._accelerator_setAllocatorSettings(PINNING)
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
