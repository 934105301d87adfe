"""Packing helpers for collectives: symmetric matrices as upper triangles, tensors in buckets."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def pack_triangle(matrix: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of a symmetric ``[n, n]`` matrix, row by row:
    ``n(n+1)/2`` numbers instead of ``n²``.
    """
    n = matrix.shape[-1]
    rows, cols = torch.triu_indices(n, n, device=matrix.device)
    return matrix[rows, cols]


def unpack_triangle(packed: Tensor, n: int, out: Tensor | None = None) -> Tensor:
    """Inverse of :func:`pack_triangle`: the symmetric matrix (written into ``out`` if given)."""
    rows, cols = torch.triu_indices(n, n, device=packed.device)
    out = torch.empty(n, n, dtype=packed.dtype, device=packed.device) if out is None else out
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out


def buckets(tensors: list[Tensor], cap_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped in order into buckets of one dtype and device, each at most
    ``cap_bytes`` (a single larger tensor gets a bucket of its own).
    """
    out: list[list[int]] = []
    size = 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        last = tensors[out[-1][-1]] if out else None
        if last is None or size + nbytes > cap_bytes or last.dtype != t.dtype or last.device != t.device:
            out.append([i])
            size = nbytes
        else:
            out[-1].append(i)
            size += nbytes
    return out


def reduce_in_buckets(tensors: list[Tensor], reduce: Callable[[Tensor], None], cap_bytes: int) -> int:
    """Flattens ``tensors`` bucket by bucket, applies the in-place collective ``reduce`` to each
    flat buffer and copies the results back; returns the number of bytes reduced.
    """
    total = 0
    for idx in buckets(tensors, cap_bytes):
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        reduce(flat)
        total += flat.numel() * flat.element_size()
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
            offset += n
    return total


def assign_by_cost(costs: list[float], world_size: int) -> list[int]:
    """Owner rank of each job, greedy longest-processing-time first: jobs by decreasing cost,
    each to the least-loaded rank (ties to the lowest rank). Deterministic on every rank.
    """
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[job] = rank
        load[rank] += costs[job]
    return owner
