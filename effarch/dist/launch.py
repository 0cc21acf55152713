"""Starting processes for the distributed pieces: one process group per worker, and
:func:`spawn`, which runs a worker on ``world`` local processes and collects what they saved.

A worker is a function ``worker(rank, world, port, out_dir, config)`` of a module (spawned
processes import it by name, so a notebook's own functions cannot be workers); inside it,
``with process_group(rank, world, port):`` joins the group and leaves it on exit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["process_group", "spawn"]


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int, backend: str = "gloo") -> Iterator[None]:
    """Join the default process group on ``127.0.0.1:port`` as ``rank`` of ``world`` (one
    thread per process, so that ranks on one machine do not fight over cores), and destroy it
    on exit. ``backend``: ``"gloo"`` (CPU tensors) or ``"nccl"`` (one GPU per rank)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        yield
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable[..., None], world: int, config: dict[str, Any]) -> dict[str, Any]:
    """Run ``worker(rank, world, port, out_dir, config)`` in ``world`` new processes
    (``torch.multiprocessing.spawn``) on a free local port, and collect what the workers
    saved with ``torch.save`` into ``out_dir`` (a temporary folder, removed afterwards):
    ``{file stem: object}``, for example ``{"rank0": ..., "rank1": ...}``. ``worker`` must be
    importable by name (a function of a module, not of a notebook); ``config`` is pickled to
    every process, tensors included."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="effarch-dist-") as out:
        mp.spawn(worker, args=(world, port, out, config), nprocs=world, join=True)
        return {f.stem: torch.load(f) for f in sorted(Path(out).glob("*.pt"))}
