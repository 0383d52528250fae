"""The ``vlmq`` command: submit images and watch the workers from the shell; run the worker,
the tiny model and the demo.

The GPU side's commands (:data:`WORKER_COMMANDS`) are forwarded to ``python -m worker``, a
process of their own, so nothing here imports ``worker``; a command whose extra is not
installed says which one to install. Exit status: 0 when everything succeeded, 1 when any
task failed or timed out, 2 for a usage or configuration error (or a missing extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from producer import __version__
from producer.client import Client, TaskHandle
from producer.config import Settings
from producer.deadletter import DeadLetters
from producer.errors import ConfigurationError, VlmqError
from producer.results import AnalysisResult

#: Commands run by ``python -m worker`` (:mod:`worker.cli`), with their help line.
WORKER_COMMANDS = {
    "worker": "run the GPU worker (-- then celery worker options)",
    "make-tiny-model": "write a tiny random Mllama for tests",
    "demo": "run the end-to-end demo",
}
#: What a command needs beyond the base install: (the extra, modules it provides).
NEEDS = {
    **dict.fromkeys(WORKER_COMMANDS, ("worker", ("torch", "transformers"))),
    "report": ("monitor", ("matplotlib",)),
    "exporter": ("monitor", ("prometheus_client",)),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlmq`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command in NEEDS:
        extra, modules = NEEDS[command]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            print(
                f"vlmq {command} needs the {extra} extra ({', '.join(missing)} not installed): "
                f"pip install 'vlmq[{extra}]'",
                file=sys.stderr,
            )
            return 2
    if command in WORKER_COMMANDS:
        return run_worker_command(argv)
    args = _parser().parse_args(argv)
    return args.run(args)


def run_worker_command(argv: Sequence[str]) -> NoReturn:
    """Replace this process with ``python -m worker ARGV`` (signals then reach the worker)."""
    os.execv(sys.executable, [sys.executable, "-m", "worker", *argv])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmq", description="Image analysis with Llama-3.2-Vision over Celery and Redis."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser(
        "submit",
        help="enqueue images with a question",
        description="Enqueue one task per image. Redis and limits come from REDIS_URL and "
        "VLMQ_* variables.",
    )
    submit.add_argument("images", nargs="+", metavar="IMG", help="image path or http(s) URL")
    submit.add_argument("-q", "--question", required=True, help="the question about each image")
    submit.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    submit.add_argument("--temperature", type=float, default=0.0, metavar="T")
    submit.add_argument("--top-p", type=float, default=1.0, metavar="P")
    submit.add_argument(
        "--priority",
        type=int,
        choices=range(10),
        metavar="0-9",
        help="0 is the highest, 9 the lowest (default: 0)",
    )
    submit.add_argument(
        "--expires",
        type=float,
        metavar="S",
        help="drop a task no worker has started within S seconds (it ends TaskExpired)",
    )
    submit.add_argument(
        "--model",
        metavar="ID",
        help="the served model id, e.g. llama-3.2v-11b-cot.bf16 (default: any worker)",
    )
    submit.add_argument("--wait", action="store_true", help="wait for and print the results")
    submit.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="with --wait, seconds to wait for all results (default: forever)",
    )
    submit.add_argument("--json", action="store_true", help="print one JSON object per line")
    submit.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="allow URLs of private, loopback and link-local hosts",
    )
    submit.set_defaults(run=_submit)

    result = commands.add_parser(
        "result",
        help="wait for and print the results of submitted tasks",
        description="Print each task's result, or its named error, once it has finished.",
    )
    result.add_argument("task_ids", nargs="+", metavar="ID")
    result.add_argument(
        "--timeout", type=float, metavar="S", help="seconds to wait for all (default: forever)"
    )
    result.add_argument("--json", action="store_true", help="print one JSON object per line")
    result.set_defaults(run=_result)

    revoke = commands.add_parser(
        "revoke",
        help="revoke tasks: a task no worker has started never runs",
        description="Revoke tasks by id; a task already inside the model finishes.",
    )
    revoke.add_argument("task_ids", nargs="+", metavar="ID")
    revoke.set_defaults(run=_revoke)

    for name, summary in WORKER_COMMANDS.items():  # listed for --help; main() forwards them
        commands.add_parser(name, help=summary, add_help=False)

    exporter = commands.add_parser(
        "exporter", help="serve queue depth and oldest-task age for Prometheus (autoscaling)"
    )
    exporter.add_argument("--port", type=int, default=9809)
    exporter.add_argument("--address", default="0.0.0.0")
    exporter.set_defaults(run=_exporter)

    top = commands.add_parser(
        "top",
        help="live view of workers: GPU, batch sizes, queue depth, throughput",
        description="Show the workers' GPU, batch and queue figures from their events.",
    )
    top.add_argument("--once", action="store_true", help="listen, print one snapshot, exit")
    top.add_argument(
        "--listen", type=float, default=3.0, metavar="S", help="with --once: seconds to listen"
    )
    top.add_argument("--interval", type=float, default=1.0, metavar="S", help="refresh period")
    top.add_argument("--record", type=Path, metavar="FILE", help="append the events (JSON lines)")
    top.set_defaults(run=_top)

    dead = commands.add_parser(
        "dead",
        help="inspect and replay dead letters (vlmq.dead)",
        description="Broker entries that workers could not decode or run are kept in the "
        "Redis list vlmq.dead, newest first, with the reason, the time and their queue.",
    )
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    dead_list = dead_commands.add_parser("list", help="show the newest dead letters")
    dead_list.add_argument("--limit", type=int, default=20, metavar="N", help="default: 20")
    dead_list.add_argument("--json", action="store_true", help="one JSON object per line")
    dead_list.set_defaults(run=_dead_list)
    dead_replay = dead_commands.add_parser(
        "replay",
        help="push dead letters back onto their queue",
        description="Push entries back onto the queue list they were taken from, as they "
        "were, and drop them from vlmq.dead. An entry that is still bad is dead-lettered again.",
    )
    which = dead_replay.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", default=[], metavar="ID", help="dead-letter ids")
    which.add_argument("--all", action="store_true", help="every entry kept whole")
    dead_replay.set_defaults(run=_dead_replay)

    report = commands.add_parser(
        "report",
        help="plot GPU utilisation, batch size and queue depth over a run (PNG)",
        description="Plot a run's worker events: a file from `vlmq top --record`, or --listen.",
    )
    report.add_argument("events", nargs="?", type=Path, metavar="EVENTS", help="JSON-lines file")
    report.add_argument("--listen", type=float, metavar="S", help="capture S seconds of events")
    report.add_argument("--save", type=Path, metavar="FILE", help="with --listen: keep events")
    report.add_argument("-o", "--output", type=Path, default=Path("vlmq-report.png"))
    report.set_defaults(run=_report)
    return parser


def _with_client(run: Callable[[Client, argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(client, args)`` with a client from the environment; Redis errors exit 1."""
    try:
        client = Client(allow_private_urls=getattr(args, "allow_private_urls", False))
    except ConfigurationError as exc:
        print(f"vlmq: {exc}", file=sys.stderr)
        return 2
    try:
        return run(client, args)
    except (OperationalError, RedisError) as exc:
        print(f"vlmq: cannot use Redis at {client.settings.redacted_url}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _submit(args: argparse.Namespace) -> int:
    return _with_client(_submit_with, args)


def _result(args: argparse.Namespace) -> int:
    def run(client: Client, args: argparse.Namespace) -> int:
        handles = [(None, client.handle(task_id)) for task_id in args.task_ids]
        return 0 if _wait(args, handles) else 1

    return _with_client(run, args)


def _revoke(args: argparse.Namespace) -> int:
    def run(client: Client, args: argparse.Namespace) -> int:
        for task_id in args.task_ids:
            client.handle(task_id).revoke()
            print(f"revoked {task_id}", flush=True)
        return 0

    return _with_client(run, args)


def _submit_with(client: Client, args: argparse.Namespace) -> int:
    failed = False
    handles: list[tuple[str | None, TaskHandle]] = []
    for image in args.images:
        try:
            handle = client.submit(
                image,
                args.question,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                priority=args.priority,
                expires=args.expires,
                model=args.model,
            )
        except VlmqError as exc:
            failed = True
            _print_error(args, image, None, exc)
            continue
        handles.append((image, handle))
        if not args.wait:
            _print_line(args, {"image": image, "task_id": handle.id}, handle.id)

    if args.wait:
        failed |= not _wait(args, handles)
    return 1 if failed else 0


def _wait(args: argparse.Namespace, handles: list[tuple[str | None, TaskHandle]]) -> bool:
    """Print each result as it is collected, under its image (None: by task id only);
    True when all succeeded in time."""
    succeeded = True
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    for image, handle in handles:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            result = handle.result(timeout=remaining)
        except (VlmqError, TimeoutError) as exc:
            succeeded = False
            _print_error(args, image, handle.id, exc)
            continue
        record = {"task_id": handle.id, **result.to_dict()}
        if image is not None:
            record["image"] = image
        _print_line(args, record, _text(image, result))
    return succeeded


def _print_line(args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    print(json.dumps(record, ensure_ascii=False) if args.json else text, flush=True)


def _print_error(
    args: argparse.Namespace, image: str | None, task_id: str | None, exc: Exception
) -> None:
    if args.json:
        record = {"task_id": task_id, "error": type(exc).__name__, "message": str(exc)}
        if image is not None:
            record["image"] = image
        print(json.dumps(record, ensure_ascii=False), flush=True)
    else:
        print(f"{image or task_id}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _text(image: str | None, result: AnalysisResult) -> str:
    heading = f"{image} (task {result.task_id})" if image is not None else f"task {result.task_id}"
    lines = [f"== {heading}", result.answer]
    if result.stages is not None:
        for stage, text in vars(result.stages).items():
            if text is not None:
                lines.append(f"  [{stage}] {text}")
    t = result.timings
    lines.append(
        f"  queued {t.queued_ms:.0f} ms, batch of {t.batch_size}, GPU {t.gpu_ms:.0f} ms, "
        f"{result.prompt_tokens} prompt + {result.answer_tokens} answer tokens, {result.model}"
    )
    return "\n".join(lines)


def _exporter(args: argparse.Namespace) -> int:
    from producer.exporter import serve

    settings = Settings.from_env()
    serve(settings.redis_url, settings.queue, args.port, args.address)
    return 0


def _top(args: argparse.Namespace) -> int:
    from producer.top import top_command

    return top_command(args)


def _dead_letters() -> DeadLetters:
    import redis

    return DeadLetters(redis.Redis.from_url(Settings.from_env().redis_url))


def _dead_list(args: argparse.Namespace) -> int:
    for letter in _dead_letters().list(args.limit):
        if args.json:
            print(json.dumps(letter.to_dict()), flush=True)
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.dead_at))
        cut = f", first {len(letter.raw)} kept" if letter.truncated else ""
        task = f" task {letter.task_id}" if letter.task_id else ""
        print(f"{letter.id}  {when} UTC  {letter.queue!r}{task}  ({letter.size} bytes{cut})")
        print(f"    reason: {letter.reason}")
        print(f"    entry:  {letter.preview()}", flush=True)
    return 0


def _dead_replay(args: argparse.Namespace) -> int:
    try:
        replayed = _dead_letters().replay(None if args.all else args.ids)
    except ValueError as exc:
        print(f"vlmq dead replay: {exc}", file=sys.stderr)
        return 2
    for letter in replayed:
        print(f"{letter.id} -> {letter.queue!r}")
    print(f"{len(replayed)} replayed")
    return 0


def _report(args: argparse.Namespace) -> int:
    from producer.report import report_command

    return report_command(args)
