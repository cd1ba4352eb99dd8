"""Deal an optimiser step's items to the ranks: each rank receives only the items it trains on."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fdfo import distributed


def step_items(permutation: torch.Tensor, step: int, num_steps: int) -> torch.Tensor:
    """Global item ids of optimiser step `step`, split first into steps, so a step never depends on rank count."""
    return permutation.view(num_steps, -1)[step]


def rank_slice(items: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The equal slice of a step's items that `rank` trains on."""
    return items.view(world_size, -1)[rank]


def fetch_items(local: list[torch.Tensor], items: torch.Tensor, items_per_rank: int) -> list[torch.Tensor]:
    """Rows of this rank's slice of `items` from every tensor in `local` (rows = this rank's own items).

    Item i lives on rank i // items_per_rank. All ranks know the whole step, so each sends exactly the
    rows the others need, with one all-to-all per tensor and no request round.
    """
    rank, world = distributed.rank(), distributed.world_size()
    slices = items.view(world, -1)
    if world == 1:
        return [x[slices[0].to(x.device)] for x in local]
    owner = torch.div(slices, items_per_rank, rounding_mode="floor")
    send_rows = [slices[q][owner[q] == rank] - rank * items_per_rank for q in range(world)]
    send_counts = [len(rows) for rows in send_rows]
    recv_counts = [int((owner[rank] == q).sum()) for q in range(world)]
    send_index = torch.cat(send_rows)
    arrival = torch.argsort(owner[rank], stable=True)  # where each received row goes, grouped by source
    out = []
    for x in local:
        received = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(received, x[send_index.to(x.device)].contiguous(), recv_counts, send_counts)
        ordered = torch.empty_like(received)
        ordered[arrival.to(x.device)] = received
        out.append(ordered)
    return out
