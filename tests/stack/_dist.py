"""Gloo ranks for the multi-process stack tests, forked from one forkserver.

``start_method="spawn"`` starts a fresh interpreter per rank, and each one imports torch and
mugv again. Here the ranks are forked from a ``multiprocessing`` forkserver that has imported
the test module (and with it torch and mugv) once: every rank starts with them loaded. The
server only imports; it runs no torch op and starts no thread before it forks.

There is one forkserver per test process, started by the first call: its preload list is that
call's. The ranks of a later module import what the server lacks when they unpickle their
function (correct, only slower).
"""

from __future__ import annotations

import multiprocessing
import socket
from collections.abc import Callable, Sequence

import torch.multiprocessing as mp

__all__ = ["free_port", "start_ranks"]


def free_port() -> int:
    """A TCP port free on ``127.0.0.1`` now (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(fn: Callable, args: tuple, nprocs: int, *, preload: Sequence[str] = ()) -> None:
    """Run ``fn(rank, *args)`` for ``rank`` in ``range(nprocs)``, each in a process forked from
    the forkserver, and wait for all of them.

    Args:
        fn: a module-level function (pickled by name); its module is preloaded by the server.
        args: picklable arguments after the rank.
        nprocs: the number of ranks.
        preload: further modules for the server to import first (e.g. what ``fn`` imports lazily).

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised (its traceback in the message).
        torch.multiprocessing.ProcessExitedException: a rank died without raising.
    """
    multiprocessing.get_context("forkserver").set_forkserver_preload([fn.__module__, *preload])
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
