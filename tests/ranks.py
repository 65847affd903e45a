"""Helpers for tests that spawn data-parallel ranks (gloo on CPU)."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int) -> None:
    """Join the gloo process group of ``world`` ranks on ``port`` (one thread per rank)."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def leave() -> None:
    """End a rank once every rank has written its results, without Python's teardown: in torch 2.13 a gloo
    process group can deadlock when it is destroyed while its worker thread still frees a finished
    collective (the worker waits for the GIL that the destroying thread holds; seen as an intermittent
    hang after every result was written). The results are on disk; nothing else needs the teardown."""
    dist.barrier()
    os._exit(0)
