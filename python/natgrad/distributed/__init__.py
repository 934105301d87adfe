"""natgrad on torch.distributed: K-FAC communication (KAISA) and sharded Fisher estimation."""
from __future__ import annotations

from natgrad.distributed.communicator import (
                                              DistributedCommunicator,
                                              LocalCommunicator,
                                              collective,
                                              group_device,
                                              make_communicator,
)
from natgrad.distributed.packing import assign_by_cost, pack_triangle, unpack_triangle

__all__ = [
    "collective",
    "DistributedCommunicator",
    "LocalCommunicator",
    "assign_by_cost",
    "group_device",
    "make_communicator",
    "pack_triangle",
    "unpack_triangle",
]
