"""``python -m bench``: every mode, one GPU, one run, within a deadline.

Order: bandwidth, model build (on the GPU), (a), (b), (c), (cb) on the in-process model; then
the model is saved (for ``from_pretrained``) and freed; then (d) with a worker process, then the
nf4 and fp8 loads through the project's ``load_model``. The results JSON is rewritten after
every mode, so a crash or a kill keeps what was measured. Sizes come from flags and are cut
to each mode's time budget using the step times measured on the way. Every mode runs each
batch shape it times once, untimed, first (its cold cost is reported apart).

The pieces, top down: this file (flags, order); ``preparation`` (device, workload, preflight);
``modes_generate`` (a, b), ``modes_worker`` (c, cb, nf4, fp8), ``modes_system`` (d, d2);
``models`` (the in-process model); ``drive`` and ``targets`` (the worker's loop and factory
as the modes run them); ``state`` (the run's shared state); ``report`` and ``tables``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from bench import tables
from bench.model_factory import saved_kind
from bench.models import free_model, load_inprocess_model, save_model_for_loading
from bench.modes_generate import mode_a, mode_b
from bench.modes_system import mode_d, mode_d2
from bench.modes_worker import mode_c, mode_cb, mode_quant
from bench.preparation import measure_bandwidth, preflight, prepare_workload, setup
from bench.progress import log
from bench.state import (
    BUDGETS,
    MIN_START,
    SAVED_MODES,
    SMOKE_BUDGETS,
    Bench,
)
from producer.errors import ConfigurationError
from worker.settings import QUANTIZED, REMOVED_PRECISIONS, check_precision

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "bench"
ALL_MODES = ["a", "b", "cb", "c", "d", *QUANTIZED]
#: Modes run only when named in ``--modes``: (d2) needs two GPUs.
EXTRA_MODES = ["d2"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="vlmq GPU benchmark: modes a (generate, batch 1), b (static batches), "
        "c (the worker's continuous engine in process), cb (the worker's batch executor in "
        "process), d (producer -> Redis -> Celery worker), nf4 and fp8 (the worker's "
        "default executor on quantized weights); d2 (as d, one worker per GPU on two GPUs) "
        "only when named.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few requests (CI)")
    p.add_argument("--modes", default=",".join(ALL_MODES), help="comma-separated modes to run")
    p.add_argument(
        "--model", choices=["11b", "mini", "tiny"], help="default: 11b (tiny if --smoke)"
    )
    p.add_argument("--device", help="default: cuda (cpu if --smoke)")
    p.add_argument(
        "--model-dir",
        type=Path,
        help="where the model is saved for (d), nf4, fp8 (default: /dev/shm/vlmq-bench-<model> "
        "if that has room, else /tmp/vlmq-bench-<model>; reused when already there)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length-scale", type=float, help="answer lengths x this (default 0.25)")
    p.add_argument("--requests-a", type=int, help="requests for (a) (default 4)")
    p.add_argument("--batches", type=int, help="closed-loop batches for b, c, d (default 2)")
    p.add_argument("--requests-quant", type=int, help="requests for nf4, fp8 (default: a batch)")
    p.add_argument(
        "--max-batch", type=int, help="batch size of b, cb; slots of c, d (default: largest fit)"
    )
    p.add_argument("--max-batch-cap", type=int, default=64, help="largest batch size tried")
    p.add_argument(
        "--engine-slots", type=int, help="slots of the engine in c and d (default: b's batch)"
    )
    p.add_argument("--max-wait-ms", type=int, default=50, help="the batcher's wait when idle")
    p.add_argument(
        "--padding-tiles",
        choices=["encode", "skip"],
        default=os.environ.get("VLMQ_PADDING_TILES", "encode"),
        help="the worker's VLMQ_PADDING_TILES, for every mode that runs the worker's engine",
    )
    p.add_argument(
        "--gpu-memory-gib",
        type=int,
        default=int(os.environ.get("VLMQ_GPU_MEMORY_GIB", "0")),
        help="the worker's VLMQ_GPU_MEMORY_GIB (0: no cap), for every mode that runs the "
        "worker's engine: its tensors, weights included, stay within this many GiB",
    )
    p.add_argument(
        "--closed-window-s",
        type=float,
        help="arrivals of the engine's saturating closed loop (c, d, quantized) last this long "
        "(default 20; 1.5 if --smoke)",
    )
    p.add_argument(
        "--rates-c", help="(c) arrival rates, x (c)'s capacity (default 0.5,0.9; 0.5 if --smoke)"
    )
    p.add_argument("--rates-d", default="0.5", help="(d) arrival rates, x (c)'s capacity")
    p.add_argument("--rate-window-s", type=float, help="arrivals per rate last this long")
    p.add_argument(
        "--stacks",
        action="store_true",
        help="sample the engine thread's stack in the saturating closed loop and print where "
        "its time went, by phase (a diagnostic: the sampler takes the GIL every 2 ms)",
    )
    p.add_argument("--probe-tokens", type=int, help="decode steps timed at batch 1 (default 32)")
    p.add_argument("--deadline-s", type=float, help="stop starting work after this (default 530)")
    p.add_argument("--budget", default="", help="per-mode seconds, e.g. c=120,d=200")
    p.add_argument(
        "--redis-url", default=os.environ.get("VLMQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
    )
    p.add_argument("--name", help="file stem of the outputs (default: <card>-<date>)")
    return p


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    smoke = args.smoke
    pick = lambda value, gpu, cpu: value if value is not None else (cpu if smoke else gpu)  # noqa: E731
    args.model = pick(args.model, "11b", "tiny")
    args.device = pick(args.device, "cuda", "cpu")
    args.length_scale = pick(args.length_scale, 0.25, 1 / 16)
    args.requests_a = pick(args.requests_a, 4, 3)
    args.batches = pick(args.batches, 2, 2)
    args.max_batch = pick(args.max_batch, None, 3)
    if smoke and args.out == DEFAULT_OUT:
        args.out = DEFAULT_OUT / "tmp"  # git-ignored
    args.rate_window_s = pick(args.rate_window_s, 10.0, 2.0)
    args.closed_window_s = pick(args.closed_window_s, 20.0, 1.5)
    args.rates_c = pick(args.rates_c, "0.5,0.9", "0.5")
    args.probe_tokens = pick(args.probe_tokens, 32, 4)
    args.deadline_s = pick(args.deadline_s, 530.0, 150.0)
    budgets = dict(SMOKE_BUDGETS if smoke else BUDGETS)
    for item in filter(None, args.budget.split(",")):
        key, _, value = item.partition("=")
        budgets[key.strip()] = float(value)
    args.budgets = budgets
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for key in REMOVED_PRECISIONS.keys() & set(args.modes):
        try:
            check_precision(key, "--modes")
        except ConfigurationError as exc:
            raise SystemExit(f"bench: {exc}") from exc
    unknown = set(args.modes) - set(ALL_MODES + EXTRA_MODES)
    if unknown:
        raise SystemExit(
            f"bench: unknown mode(s) {sorted(unknown)}; choose from {ALL_MODES + EXTRA_MODES}"
        )
    return args


def run_all(bench: Bench) -> int:
    """Every phase and mode in order; exit 0 when no mode failed."""
    setup(bench)
    prepare_workload(bench)
    preflight(bench)
    measure_bandwidth(bench)
    modes = bench.args.modes
    if bench.needs_inprocess() or (bench.needs_saved() and bench.args.model == "tiny"):
        load_inprocess_model(bench)
    # Saved before the engine fuses the in-process model's weights in place.
    if bench.needs_saved():
        bench.results.setdefault("model", {"kind": bench.args.model})
        saved = bench.model_dir is not None and saved_kind(bench.model_dir) == bench.args.model
        least = min(MIN_START[k] for k in SAVED_MODES if k in bench.active())
        if not saved and not bench.args.smoke and bench.left() < least + 45:
            for key in SAVED_MODES:
                bench.skips.setdefault(key, "deadline: no time left to save the model")
        else:
            try:
                save_model_for_loading(bench)
            except Exception as exc:
                log(f"saving the model failed: {type(exc).__name__}: {exc}")
                bench.results["model"]["save_error"] = f"{type(exc).__name__}: {exc}"
                for key in SAVED_MODES:
                    bench.skips.setdefault(key, f"the model could not be saved: {exc}")
    in_process = (("a", mode_a), ("b", mode_b), ("c", mode_c), ("cb", mode_cb))
    for key, fn in in_process:
        if key in modes:
            bench.run_mode(key, fn)
    free_model(bench)
    if "d" in modes:
        bench.run_mode("d", mode_d)
    if "d2" in modes:
        bench.run_mode("d2", mode_d2)
    for key in QUANTIZED:
        if key in modes:
            bench.run_mode(key, mode_quant)
    return finish(bench)


def finish(bench: Bench) -> int:
    """Write the JSON, the Markdown and the plots; print the console table."""
    bench.results["meta"]["finished"] = time.time()
    bench.results["meta"]["wall_s"] = time.time() - bench.t_start
    if bench.sampler is not None:
        bench.sampler.stop()
    bench.save()
    assert bench.json_path is not None
    bench.json_path.with_suffix(".md").write_text(tables.markdown(bench.results))
    print(tables.console(bench.results), flush=True)
    log(f"results: {bench.json_path} and {bench.json_path.with_suffix('.md')}")
    try:
        from bench.plot import plot_all  # matplotlib: optional

        for path in plot_all(bench.json_path):
            log(f"plot: {path}")
    except ImportError as exc:
        log(f"no plots here ({exc}); draw them with: python -m bench.plot {bench.json_path}")
    except Exception as exc:
        log(f"plotting failed ({type(exc).__name__}: {exc}); the JSON is complete")
    failed = [k for k, m in bench.results["modes"].items() if m.get("status") == "failed"]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 when no mode failed (skipped modes are not failures)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _defaults(build_parser().parse_args(argv))
    os.environ["VLMQ_PADDING_TILES"] = args.padding_tiles  # the worker of (d) reads it too

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    try:
        return run_all(bench)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        with contextlib.suppress(Exception):
            bench.results.setdefault("meta", {})["wall_s"] = time.time() - bench.t_start
            if bench.sampler is not None:
                bench.sampler.stop()
            bench.save()
