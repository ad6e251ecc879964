"""Run a function on N real processes over gloo (free port), re-raising any failure in the test process."""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, errors) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import hf_loop as hl

    env = hl.init_distributed(backend="gloo", timeout=60)
    try:
        result = fn(env, *args)
        errors.put((rank, None, result))
    except BaseException:
        errors.put((rank, traceback.format_exc(), None))
    finally:
        hl.shutdown_distributed()


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 120) -> list:
    """Call ``fn(env, *args)`` on ``world_size`` gloo processes; return the per-rank results in rank order.

    ``fn`` must be a module-level function (it is pickled for the spawned processes); results must be picklable.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    failures = []
    for _ in range(world_size):
        try:
            rank, error, result = queue.get(timeout=timeout)
        except Exception:  # a process died without reporting (or hung): kill the rest and fail
            for p in procs:
                p.kill()
            raise AssertionError(
                f"distributed run: no answer within {timeout}s; exit codes {[p.exitcode for p in procs]}"
            ) from None
        if error:
            failures.append(f"rank {rank}:\n{error}")
        results[rank] = result
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    if failures:
        raise AssertionError("distributed run failed\n" + "\n".join(failures))
    return [results[r] for r in range(world_size)]
