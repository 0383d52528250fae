"""``vlmq worker``: the plain Celery worker command, pinned to one GPU."""

import argparse
import os
import sys


def celery_worker_argv(gpu: int | None, loglevel: str, extra: list[str]) -> list[str]:
    """The ``celery worker`` command line that ``vlmq worker`` runs."""
    node = f"vlmq-gpu{gpu}@%h" if gpu is not None else "vlmq@%h"
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "--pool=solo",
        f"--loglevel={loglevel}",
        "-n",
        node,
        *extra,
    ]


def worker_command(args: argparse.Namespace) -> int:
    """Replace this process with ``celery -A worker.app worker`` (never returns on success)."""
    env = dict(os.environ)
    if args.gpu is not None:
        env["VLMQ_GPU"] = str(args.gpu)
    extra = [a for a in (args.extra or []) if a != "--"]
    argv = celery_worker_argv(args.gpu, args.loglevel, extra)
    os.execve(sys.executable, argv, env)
    return 1
