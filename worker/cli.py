"""The GPU side's commands (``python -m worker``, which ``vlmq`` forwards to): ``worker``
(the plain Celery worker, one pinned process per GPU), ``make-tiny-model`` and ``demo``.

Exit status: that of the worker or demo; 2 for a usage or configuration error.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from producer.errors import ConfigurationError
from worker.monitoring.nvml import count_gpus

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def celery_worker_argv(
    gpu: str | int | None = None,
    loglevel: str | None = "info",
    extra: Sequence[str] = (),
    *,
    node: str | None = None,
) -> list[str]:
    """The one ``celery -A worker.app worker`` command line (the CLI, demo, bench and tests).

    ``node`` names the worker (default ``vlmq-gpu<N>@%h`` for ``gpu``, else ``vlmq@%h``);
    ``loglevel`` None leaves Celery's default; ``extra`` goes last, e.g. ``--without-mingle``.
    """
    if node is None:
        node = f"vlmq-gpu{gpu}@%h" if gpu is not None else "vlmq@%h"
    level = [] if loglevel is None else [f"--loglevel={loglevel}"]
    return [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker",
        "--pool=solo", *level, "-n", node, *extra,
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run a GPU-side command with ``argv`` (default: ``sys.argv[1:]``)."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigurationError as exc:
        print(f"vlmq: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmq", description="vlmq's GPU-side commands.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker = commands.add_parser(
        "worker",
        help="run the GPU worker",
        description="Run the GPU worker. Arguments after -- go to the celery worker.",
    )
    pinned = worker.add_mutually_exclusive_group()
    pinned.add_argument("--gpu", type=int, metavar="N", help="CUDA device index")
    pinned.add_argument(
        "--gpus", metavar="all|0,1,…", help="one pinned worker process per listed GPU"
    )
    worker.add_argument("--loglevel", default="info")
    worker.add_argument("extra", nargs=argparse.REMAINDER, help="-- then celery worker options")
    worker.set_defaults(run=worker_command)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random Mllama for tests")
    tiny.add_argument("dir", type=Path, metavar="DIR")
    tiny.set_defaults(run=_make_tiny_model)

    demo = commands.add_parser("demo", help="run the end-to-end demo")
    demo.set_defaults(run=_demo)
    return parser


def _make_tiny_model(args: argparse.Namespace) -> int:
    from worker.model.tiny import make_tiny_model

    print(make_tiny_model(args.dir))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from worker.demo import main as demo_main

    return demo_main()


def parse_gpus(spec: str, count_gpus=None) -> list[str]:
    """``all`` or a comma-separated list of GPU indices → the list of indices."""
    if spec.strip().lower() == "all":
        count = (count_gpus or _count_gpus)()
        if count == 0:
            raise ConfigurationError("--gpus all: NVML sees no GPU on this host")
        return [str(i) for i in range(count)]
    gpus = [part.strip() for part in spec.split(",") if part.strip()]
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise ConfigurationError(f"--gpus takes 'all' or distinct indices like 0,1,3; got {spec!r}")
    return gpus


def worker_command(args: argparse.Namespace) -> int:
    """Run ``celery -A worker.app worker`` pinned to ``--gpu``, or one per GPU of ``--gpus``."""
    extra = [a for a in (args.extra or []) if a != "--"]
    gpus = parse_gpus(args.gpus) if args.gpus else [None if args.gpu is None else str(args.gpu)]
    if len(gpus) == 1:
        env = _env_for(gpus[0])
        os.execve(sys.executable, celery_worker_argv(gpus[0], args.loglevel, extra), env)
    return supervise({gpu: celery_worker_argv(gpu, args.loglevel, extra) for gpu in gpus})


def supervise(commands: dict[str, list[str]]) -> int:
    """Start one worker per GPU; forward stop signals; if one exits, stop the others.

    Returns the exit status of the child that ended first, else the first non-zero
    one, else 0. A service manager
    (systemd, Kubernetes) then restarts the whole set.
    """
    children = {gpu: subprocess.Popen(argv, env=_env_for(gpu)) for gpu, argv in commands.items()}

    stopping: list[int] = []

    def forward(signum, _frame):
        stopping.append(signum)
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        while all(child.poll() is None for child in children.values()):
            time.sleep(0.5)
        first = next(child for child in children.values() if child.poll() is not None)
        if not stopping:  # a second SIGTERM would cut the others' warm shutdown short
            forward(signal.SIGTERM, None)
        codes = [child.wait() for child in children.values()]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return first.returncode or next((code for code in codes if code), 0)


def _env_for(gpu: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if gpu is not None:
        env["VLMQ_GPU"] = gpu
    return env


def _count_gpus() -> int:
    try:
        return count_gpus()
    except Exception as exc:
        raise ConfigurationError(
            f"--gpus all needs NVML (nvidia-ml-py and a driver): {exc}"
        ) from exc
