"""``python -m bench``: every mode, one GPU, one run, within a deadline.

Order: bandwidth, model build (on the GPU), (a), (b), (c), (cb) on the in-process model; then
the model is saved (for ``from_pretrained``) and freed; then (d) with a worker process, then the
nf4 and int8 loads through the project's ``load_model``. The results JSON is rewritten after
every mode, so a crash or a kill keeps what was measured. Sizes come from flags and are cut
to each mode's time budget using the step times measured on the way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import os
import platform
import re
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.progress import elapsed, log, set_log_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "bench"
ALL_MODES = ["a", "b", "cb", "c", "d", "nf4", "int8"]
#: Modes run only when named in ``--modes``: (d2) needs two GPUs.
EXTRA_MODES = ["d2"]
#: The modes that load the saved model.
SAVED_MODES = ("d", "d2", "nf4", "int8")
#: Seconds each mode may take at most, model loads included (the run's deadline still rules).
BUDGETS = {"a": 25, "b": 55, "c": 95, "cb": 45, "d": 125, "d2": 100, "nf4": 70, "int8": 70}
SMOKE_BUDGETS = {"a": 20, "b": 20, "c": 30, "cb": 20, "d": 60, "d2": 60, "nf4": 1, "int8": 1}
#: Least seconds left on the deadline for a mode to start at all.
MIN_START = {"a": 10, "b": 20, "c": 40, "cb": 20, "d": 70, "d2": 60, "nf4": 50, "int8": 50}
SMOKE_MIN_START = {"a": 2, "b": 2, "c": 3, "cb": 2, "d": 10, "d2": 10, "nf4": 1, "int8": 1}
#: Largest closed loop planned for the engine (its images are made before it starts).
MAX_CLOSED_REQUESTS = 1500


def mf_saved_kind(path: Path | None) -> str | None:
    from bench.model_factory import saved_kind

    return saved_kind(path) if path is not None else None


class SkipMode(Exception):
    """A mode that cannot run here or now; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="vlmq GPU benchmark: modes a (generate, batch 1), b (static batches), "
        "c (the worker's continuous engine in process), cb (the worker's batch executor in "
        "process), d (producer -> Redis -> Celery worker), nf4, int8 (the worker's default "
        "executor on quantized weights); d2 (as d, one worker per GPU on two GPUs) only when "
        "named.",
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
        help="where the model is saved for (d), nf4, int8 (default: /dev/shm/vlmq-bench-<model> "
        "if that has room, else /tmp/vlmq-bench-<model>; reused when already there)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length-scale", type=float, help="answer lengths x this (default 0.25)")
    p.add_argument("--requests-a", type=int, help="requests for (a) (default 4)")
    p.add_argument("--batches", type=int, help="closed-loop batches for b, c, d (default 2)")
    p.add_argument("--requests-quant", type=int, help="requests for nf4/int8 (default: a batch)")
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
    unknown = set(args.modes) - set(ALL_MODES + EXTRA_MODES)
    if unknown:
        raise SystemExit(
            f"bench: unknown mode(s) {sorted(unknown)}; choose from {ALL_MODES + EXTRA_MODES}"
        )
    return args


def _rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def rate_start(fraction: float) -> int:
    """The first workload index of the Poisson run at ``fraction`` x capacity: its own
    requests (and images), the same in (c) and (d)."""
    return 1_000_000 + round(fraction * 1000) * 1000


def _slug(text: str) -> str:
    text = re.sub(r"^nvidia\s+", "", text.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


class Bench:
    """One benchmark run; ``results`` is what goes to JSON."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.time()
        self.deadline = self.t_start + args.deadline_s - elapsed()
        self.results: dict[str, Any] = {"modes": {}, "phases": []}
        self.model = None
        self.processor = None
        self.sampler = None
        self.model_dir: Path | None = args.model_dir
        self._tmp = None
        self.max_batch: int | None = args.max_batch
        self.capacity_c: float | None = None
        self.engine_slots: int | None = None  # the slots (c)'s engine got, for (d)
        self._fresh = 0
        self.json_path: Path | None = None
        self.skips: dict[str, str] = {}

    # -- bookkeeping -----------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        from bench import report

        if self.sampler is not None:
            self.results["timeline"] = self.sampler.to_dict()
        report.add_ratios(self.results)
        if self.json_path is not None:
            report.write_json(self.results, self.json_path)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.time()
        log(f"== {name} ({self.left():.0f} s left of the deadline)")
        try:
            yield
        finally:
            self.results["phases"].append({"name": name, "t0": t0, "t1": time.time()})
            log(f"== {name} done in {time.time() - t0:.1f} s")

    def mode_stop_at(self, key: str) -> float:
        return min(time.time() + self.args.budgets.get(key, 60), self.deadline - 5)

    # -- setup -----------------------------------------------------------------------
    def setup(self) -> None:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        args = self.args
        on_cuda = args.device.startswith("cuda")
        if on_cuda and not torch.cuda.is_available():
            raise SystemExit(
                "bench: no CUDA GPU is visible (torch.cuda.is_available() is False; torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a CUDA "
                "host, or use --smoke (tiny model on the CPU)."
            )
        if args.model == "11b" and not on_cuda:
            raise SystemExit("bench: the 11B model needs --device cuda; use --model mini on a CPU")
        if on_cuda:
            props = torch.cuda.get_device_properties(0)
            device = {
                "name": props.name,
                "total_memory": props.total_memory,
                "capability": f"{props.major}.{props.minor}",
                "uuid": str(getattr(props, "uuid", "")) or None,
                "count": torch.cuda.device_count(),
                "uuids": [
                    str(getattr(torch.cuda.get_device_properties(i), "uuid", "")) or None
                    for i in range(torch.cuda.device_count())
                ],
            }
        else:
            device = {"name": f"CPU ({platform.processor() or platform.machine()})",
                      "total_memory": None, "cpus": os.cpu_count()}  # fmt: skip
        self.results["device"] = device
        date = datetime.date.today().isoformat()
        stem = args.name or f"{'cpu-smoke' if args.smoke else _slug(device['name'])}-{date}"
        args.out.mkdir(parents=True, exist_ok=True)
        self.json_path = args.out / f"{stem}.json"
        set_log_file(args.out / f"{stem}.log")
        self.results["meta"] = {
            "command": "python -m bench " + shlex.join(sys.argv[1:]),
            "date": date,
            "started": self.t_start,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "smoke": args.smoke,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }
        log(f"device: {device['name']}; torch {torch.__version__}, transformers "
            f"{transformers.__version__}; outputs {self.json_path.with_suffix('.*')}")  # fmt: skip
        from bench.gpu_sampler import GpuSampler

        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        self.sampler = GpuSampler(
            index=int(visible) if visible.isdigit() else 0, uuid=device.get("uuid")
        )
        if on_cuda:
            self.sampler.start()
            log(f"GPU sampling: {self.sampler.source} {self.sampler.error or ''}")
        else:
            self.sampler.source = "none (CPU run)"
        self.save()

    def measure_bandwidth(self) -> None:
        from bench.bandwidth import measure_copy_bandwidth

        with self.phase("bandwidth"):
            on_cuda = self.args.device.startswith("cuda")
            bw = measure_copy_bandwidth(self.args.device, (2 << 30) if on_cuda else (128 << 20))
            self.results["bandwidth"] = bw
            log(f"device-to-device copy: {bw['bytes_per_s'] / 1e9:.0f} GB/s (read + write)")
        self.save()

    def prepare_workload(self) -> None:
        import statistics

        from bench.model_factory import TILE_SIZES
        from bench.workload import ANSWER_MAX, Workload, mean_answer_tokens, scaled_length
        from producer.protocol import Limits

        a = self.args
        self.workload = Workload(
            seed=a.seed, tile_size=TILE_SIZES[a.model], length_scale=a.length_scale
        )
        self.probe_spec = next(
            (s for s in self.workload.requests(64) if s.tiles == 4), self.workload.request(0)
        )
        self._images: dict[int, bytes] = {}
        self.median_answer = round(
            statistics.median(s.answer_tokens for s in self.workload.requests(1000))
        )
        # The engine's slots hold the longest answer (the worker sizes them by this limit).
        longest = max(scaled_length(ANSWER_MAX, a.length_scale), 1 + a.probe_tokens)
        self.limits = Limits(max_new_tokens=longest)
        self.results["workload"] = {
            **self.workload.to_dict(),
            "mean_answer_tokens": mean_answer_tokens(a.length_scale),
            "median_answer_tokens": self.median_answer,
            "max_new_tokens": longest,
            "probe_request": dataclasses.asdict(self.probe_spec),
        }

    def image_of(self, spec) -> bytes:
        data = self._images.get(spec.index)
        if data is None:
            data = self._images[spec.index] = self.workload.image_bytes(spec)
        return data

    def probe_spec_of(self, tokens: int):
        """The probe request (4 tiles) with an answer of ``tokens``."""
        return dataclasses.replace(self.probe_spec, answer_tokens=tokens)

    def fresh_images(self, count: int) -> list[bytes]:
        """Images of the probe request's size never used before (no engine can reuse their
        cross-attention cache)."""
        out = []
        for _ in range(count):
            self._fresh += 1
            spec = dataclasses.replace(
                self.probe_spec, image_seed=self.probe_spec.image_seed + self._fresh
            )
            out.append(self.workload.image_bytes(spec))
        return out

    def settings(self, slots: int, precision: str | None = None):
        """The worker settings the in-process executors are built from (as the worker does)."""
        from worker.settings import WorkerSettings

        on_cuda = self.args.device.startswith("cuda")
        return WorkerSettings(
            model=str(self.model_dir or f"bench-{self.args.model}"),
            precision=precision or ("bf16" if on_cuda else "fp32"),
            device="cuda" if on_cuda else "cpu",
            max_batch_size=slots,
            max_wait_ms=self.args.max_wait_ms,
            padding_tiles=self.args.padding_tiles,
            limits=self.limits,
        )

    # -- the model -------------------------------------------------------------------
    def active(self) -> list[str]:
        return [m for m in self.args.modes if m not in self.skips]

    def needs_inprocess(self) -> bool:
        return any(m in self.active() for m in ("a", "b", "c", "cb"))

    def needs_saved(self) -> bool:
        return any(m in self.active() for m in SAVED_MODES)

    def preflight(self) -> None:
        """Before any model is built: which modes this host cannot run, and where the model
        will be saved. Those modes are skipped with the reason; nothing is spent on them."""
        import importlib.util
        import shutil

        from bench import model_factory as mf

        a = self.args
        on_cuda = a.device.startswith("cuda")
        for key in ("d", "d2"):
            if key not in a.modes:
                continue
            if importlib.util.find_spec("celery") is None:
                self.skips[key] = "celery is not installed"
            else:
                import redis

                try:
                    redis.Redis.from_url(a.redis_url, socket_connect_timeout=2).ping()
                except (redis.RedisError, ValueError) as exc:
                    self.skips[key] = f"no Redis answers at {a.redis_url} ({exc})"
        count = self.results["device"].get("count", 0)
        if "d2" in a.modes and on_cuda and count < 2:
            self.skips.setdefault("d2", f"fewer than 2 GPUs are visible ({count})")
        for key in ("nf4", "int8"):
            if key not in a.modes:
                continue
            missing = [
                m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None
            ]
            if not on_cuda:
                self.skips[key] = "quantized weights need a CUDA GPU (bitsandbytes)"
            elif missing:
                self.skips[key] = (
                    f"{' and '.join(missing)} not installed (transformers loads bitsandbytes "
                    "weights only with both)"
                )
        if self.needs_saved() and a.model != "tiny":
            need = 23e9 if a.model == "11b" else 1e9
            if a.model_dir is None:
                ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                shm = Path("/dev/shm")
                shm_ok = shm.is_dir() and shutil.disk_usage(shm).free > need and ram - need > 64e9
                base = shm if shm_ok else Path(tempfile.gettempdir())
                self.model_dir = base / f"vlmq-bench-{a.model}"
            if mf.saved_kind(self.model_dir) != a.model:
                parent = self.model_dir if self.model_dir.exists() else self.model_dir.parent
                free = shutil.disk_usage(parent).free
                if free < need:
                    for key in SAVED_MODES:
                        self.skips.setdefault(
                            key,
                            f"{free / 1e9:.0f} GB free at {parent}; the model needs "
                            f"{need / 1e9:.0f}",
                        )
        for key, reason in self.skips.items():
            if key in a.modes:
                log(f"{key} will be skipped: {reason}")
        self.results["preflight"] = {"skips": self.skips, "model_dir": str(self.model_dir)}

    def load_inprocess_model(self) -> None:
        import torch

        from bench import model_factory as mf

        a = self.args
        info: dict[str, Any] = {"kind": a.model}
        with self.phase("model"):
            t0 = time.perf_counter()
            if a.model == "tiny":
                from worker.model.loading import load_model

                self._tmp = tempfile.TemporaryDirectory(prefix="vlmq-bench-tiny-")
                self.model_dir = mf.prepare_tiny(Path(self._tmp.name))
                self.model, self.processor = load_model(
                    str(self.model_dir), precision="fp32", device=a.device
                )
                info["saved"] = True
            else:
                config = mf.build_config(a.model)
                log(f"building {a.model} with random weights on {a.device}: {mf.describe(config)}")
                dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
                self.model = mf.build_random_model(
                    config, device=a.device, dtype=dtype, seed=a.seed
                )
                self.processor = mf.build_processor(mf.TILE_SIZES[a.model])
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
            info["build_s"] = time.perf_counter() - t0
            wb = mf.weight_bytes(self.model)
            info.update(
                parameters=mf.count_parameters(self.model),
                weight_bytes=wb["total"],
                decode_weight_bytes=wb["decode"],
                dtype=str(next(self.model.parameters()).dtype),
                cache=mf.cache_bytes(self.model.config, 2 if a.device.startswith("cuda") else 4),
                architecture=mf.describe(self.model.config),
            )
            mf.log_model(self.model, f"model built in {info['build_s']:.1f} s")
        self.results["model"] = info
        self.save()

    def save_model_for_loading(self) -> None:
        from bench import model_factory as mf

        if self.model_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vlmq-bench-")
            self.model_dir = Path(self._tmp.name)
        if mf.saved_kind(self.model_dir) == self.args.model:
            log(f"reusing the {self.args.model} model already saved in {self.model_dir}")
            info = self.results.setdefault("model", {"kind": self.args.model})
            info.update(save_s=None, reused_dir=str(self.model_dir))
            if "cache" not in info:
                info.update(mf.describe_saved(self.model_dir))
            return
        if self.model is None:
            self.load_inprocess_model()
        with self.phase("save"):
            log(f"saving the model to {self.model_dir} (for from_pretrained)")
            seconds = mf.save_bench_model(
                self.model, self.processor, self.model_dir, self.args.model
            )
            size = sum(f.stat().st_size for f in self.model_dir.iterdir() if f.is_file())
            log(f"saved {size / 1e9:.1f} GB in {seconds:.1f} s ({size / seconds / 1e9:.2f} GB/s)")
            self.results["model"].update(save_s=seconds, saved_bytes=size, dir=str(self.model_dir))
        self.save()

    def free_model(self) -> None:
        import torch

        self.model = None
        self.processor = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            log(f"model freed; {torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated")

    # -- helpers for modes ------------------------------------------------------------
    def peak_memory(self, t0: float, t1: float, inprocess: bool, window=None) -> dict:
        import torch

        out: dict[str, Any] = {}
        if inprocess and torch.cuda.is_available():
            out["torch_peak_allocated"] = torch.cuda.max_memory_allocated()
            out["torch_peak_reserved"] = torch.cuda.max_memory_reserved()
        window = window or (self.sampler.window if self.sampler else None)
        nvml = window(t0, t1) if window else {}
        out["nvml_peak_used"] = nvml.get("mem_peak")
        out["peak_bytes"] = out.get("nvml_peak_used") or out.get("torch_peak_reserved")
        return out

    def reset_peak(self) -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def summarize(self, key: str, runs: list, t0: float, inprocess: bool, window=None) -> None:
        from bench import report

        mode = self.results["modes"][key]
        mode["runs"] = [r.to_dict() if hasattr(r, "to_dict") else r for r in runs]
        window = window or (self.sampler.window if self.sampler else None)
        mode["summaries"] = [report.summarize_run(r, window) for r in mode["runs"]]
        mode["peak_mem"] = self.peak_memory(t0, time.time(), inprocess, window)
        self.floors(key)
        bad = [s for s in mode["summaries"] if s["n_failed"] or s["n_short"] or s["stopped_early"]]
        mode["status"] = "partial" if bad else "ok"
        h = report.headline(mode)
        if h:
            f = report._f
            log(
                f"{key}: {f(h['output_tokens_per_s'])} tok/s, {f(h['images_per_s'], '{:.2f}')} "
                f"img/s, p50 {f(h['latency_p50_s'], '{:.2f}')} s, p99 "
                f"{f(h['latency_p99_s'], '{:.2f}')} s, mean batch {f(h.get('mean_batch'))}, "
                f"{h['n_ok']}/{h['n_planned']} answered"
            )

    def floors(self, key: str) -> None:
        from bench import report
        from bench.bandwidth import decode_floor_ms

        bw = (self.results.get("bandwidth") or {}).get("bytes_per_s")
        mode = self.results["modes"][key]
        model = self.results.get("model") or {}
        weights = mode.get("decode_weight_bytes") or model.get("decode_weight_bytes")
        cache = model.get("cache")
        if not (bw and weights and cache):
            return
        h = report.headline(mode) or {}
        context = (h.get("mean_prompt_tokens") or 40) + (h.get("mean_answer_tokens") or 0) / 2
        kw = dict(
            weight_bytes=weights,
            cross_bytes_per_image=cache["cross_per_image"],
            self_bytes_per_token=cache["self_per_token"],
            context_tokens=context,
            bytes_per_s=bw,
        )
        mode["floor"] = {"batch1": decode_floor_ms(batch=1, **kw)}
        batch = report.saturated(h).get("mean_rows") or h.get("mean_batch")
        if batch:
            mode["floor"]["at_batch"] = decode_floor_ms(batch=batch, **kw)

    def start_mode(self, key: str, label: str) -> dict:
        from bench.report import MODE_LABELS

        mode = {"label": MODE_LABELS.get(key, label), "status": "running", "started": time.time()}
        self.results["modes"][key] = mode
        if key in self.skips:
            raise SkipMode(self.skips[key])
        need = (SMOKE_MIN_START if self.args.smoke else MIN_START)[key]
        if self.left() < need:
            raise SkipMode(f"deadline: {self.left():.0f} s left, this mode needs {need} s or more")
        return mode

    def run_mode(self, key: str, fn) -> None:
        t0 = time.time()
        try:
            with self.phase(f"mode {key}"):
                fn(key)
        except SkipMode as exc:
            self.results["modes"][key].update(status="skipped", reason=str(exc))
            log(f"{key}: skipped: {exc}")
        except (KeyboardInterrupt, SystemExit):
            self.results["modes"].setdefault(key, {}).update(status="interrupted")
            self.save()
            raise
        except Exception as exc:
            self.results["modes"].setdefault(key, {}).update(
                status="failed",
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
            )
            log(f"{key}: FAILED: {type(exc).__name__}: {exc}")
            log(traceback.format_exc(limit=6))
            self.reset_peak()
        finally:
            self.results["modes"].setdefault(key, {})["seconds"] = time.time() - t0
            self.save()

    def sized_by_time(self, lengths: list[int], per_item, budget_s: float, least: int) -> int:
        """How many of the items (in order) fit ``budget_s`` by the estimate ``per_item``."""
        spent, n = 0.0, 0
        for length in lengths:
            spent += per_item(length)
            if spent > budget_s and n >= least:
                break
            n += 1
        return n

    # -- modes -------------------------------------------------------------------------
    def mode_a(self, key: str) -> None:
        from bench.modes import Schedule, drive, generate_target, probe_step_ms, warm_up

        mode = self.start_mode(key, "a")
        stop_at = self.mode_stop_at(key)
        self.reset_peak()
        t0 = time.time()
        target = generate_target(self.model, self.processor, 1, "(a)", limits=self.limits)
        mode["warmup_s"] = warm_up(target, self.probe_spec, self.fresh_images(1)[0])
        probe = probe_step_ms(
            target, self.probe_spec, self.fresh_images(4), k=self.args.probe_tokens
        )
        mode["probe"] = probe
        log(f"a: batch 1: {probe['step_ms']:.1f} ms per decode step, first token "
            f"{probe['first_token_ms']:.0f} ms")  # fmt: skip
        specs = self.workload.requests(self.args.requests_a)
        per = lambda n: (probe["first_token_ms"] + (n - 1) * probe["step_ms"]) / 1000.0  # noqa: E731
        n = self.sized_by_time([s.answer_tokens for s in specs], per, stop_at - time.time(), 2)
        if n < len(specs):
            log(f"a: {n} of {len(specs)} requests fit the budget")
        run = drive(
            target, specs[:n], self.image_of, Schedule.closed(2), name="closed", stop_at=stop_at
        )
        self.summarize(key, [run], t0, True)

    def fit_batch(self) -> dict:
        """The largest batch (power of two up to the cap) whose worst case fits in memory,
        with its prefill and step times."""
        import torch

        from bench.modes import Job, generate_target, serve_now

        a = self.args
        cache = self.results["model"]["cache"]
        total = torch.cuda.get_device_properties(0).total_memory
        longest = max(s.answer_tokens for s in self.workload.requests(200))
        data = self.image_of(self.probe_spec)
        k = 8
        tried = []
        b = 1 << (max(1, a.max_batch_cap).bit_length() - 1)
        while b >= 1:
            target = generate_target(self.model, self.processor, b, f"(b) fit {b}")
            self.reset_peak()
            entry: dict[str, Any] = {"batch": b}
            try:
                times = []
                for tokens in (1, 1 + k):
                    spec = dataclasses.replace(self.probe_spec, answer_tokens=tokens)
                    t = time.perf_counter()
                    outcomes = serve_now(target, [Job(spec, data) for _ in range(b)])
                    times.append(time.perf_counter() - t)
                    errors = [o.error for o in outcomes if o.error is not None]
                    if errors:  # the executor turns an OOM into every request's error
                        raise RuntimeError(str(errors[0]))
                peak = torch.cuda.max_memory_reserved()
                growth = b * cache["self_per_token"] * (longest + 64)
                entry.update(
                    first_token_s=times[0],
                    step_ms=(times[1] - times[0]) / k * 1000.0,
                    peak_reserved=peak,
                    need=peak + growth,
                    fits=peak + growth <= 0.92 * total,
                )
            except Exception as exc:  # OOM, or a cuBLAS/cuDNN allocation failure
                entry.update(fits=False, error=f"{type(exc).__name__}: {str(exc)[:160]}")
            tried.append(entry)
            gc.collect()
            torch.cuda.empty_cache()
            log(f"b: batch {b}: " + ("fits" if entry["fits"] else "does not fit") + (
                f", first token {entry['first_token_s']:.2f} s, {entry['step_ms']:.1f} ms/step, "
                f"need {entry['need'] / 2**30:.1f} GiB" if "need" in entry else ""))  # fmt: skip
            if entry["fits"]:
                return {"batch": b, "tried": tried, **entry}
            b //= 2
        raise RuntimeError("not even a batch of 1 fits in GPU memory")

    def ensure_batch(self) -> int:
        """The batch size of b and cb, and the engine slots of c, d and the quantized modes:
        ``--max-batch``, else the largest that fits (found once, on the in-process model),
        else 16 (4 on a CPU)."""
        if self.max_batch is None:
            if self.args.device.startswith("cuda") and self.model is not None:
                self.results["batch_fit"] = self.fit_batch()
                self.max_batch = self.results["batch_fit"]["batch"]
            else:
                self.max_batch = 16 if self.args.device.startswith("cuda") else 4
            self.save()
        return self.max_batch

    def batch_estimate(self, key: str) -> float | None:
        """Seconds one full static batch takes, by the fit probe (if it ran)."""
        fit = self.results.get("batch_fit")
        if not fit or "step_ms" not in fit:
            return None
        longest = max(s.answer_tokens for s in self.workload.requests(self.max_batch or 1))
        return fit["first_token_s"] + longest * fit["step_ms"] / 1000.0

    def mode_b(self, key: str) -> None:
        from bench.modes import Schedule, drive, generate_target, probe_step_ms, warm_up

        mode = self.start_mode(key, "b")
        stop_at = self.mode_stop_at(key)
        b = self.ensure_batch()
        mode["batch"] = b
        log(f"b: static batches of {b}")
        self.reset_peak()
        t0 = time.time()
        a_probe = (self.results["modes"].get("a") or {}).get("probe")
        if a_probe:
            mode["probe"] = {**a_probe, "note": "the same generate path as (a) at batch 1"}
        else:
            one = generate_target(self.model, self.processor, 1, "(b) probe", limits=self.limits)
            warm_up(one, self.probe_spec, self.fresh_images(1)[0])
            mode["probe"] = probe_step_ms(
                one, self.probe_spec, self.fresh_images(4), k=self.args.probe_tokens
            )
        batches = self.args.batches
        est = self.batch_estimate(key)
        if est:
            fit_n = max(1, int((stop_at - time.time()) // est))
            if fit_n < batches:
                log(f"b: {fit_n} of {batches} batches fit the budget (about {est:.0f} s each)")
                batches = fit_n
        target = generate_target(self.model, self.processor, b, "(b)", limits=self.limits)
        specs = self.workload.requests(batches * b)
        run = drive(
            target, specs, self.image_of, Schedule.closed(2 * b), name="closed", stop_at=stop_at
        )
        self.summarize(key, [run], t0, True)

    def continuous(self, model, processor, slots: int, label: str, precision: str | None = None):
        """The worker's default executor over ``model`` with ``slots`` engine slots, or with as
        many as the engine's memory planner fits when fewer do (``info["slots_asked"]``)."""
        from bench.modes import continuous_target

        try:
            return continuous_target(model, processor, self.settings(slots, precision), label)
        except ValueError as exc:
            fit = self.slots_that_fit(model)
            if not 0 < fit < slots:
                raise
            log(f"{label}: {exc}; the engine's planner fits {fit} slots: using them")
        target = continuous_target(model, processor, self.settings(fit, precision), label)
        target.info["slots_asked"] = slots
        return target

    def slots_that_fit(self, model) -> int:
        """The slots the engine's planner would choose by itself for the workload's lengths."""
        from worker.engine.parts import MllamaParts
        from worker.engine.slots import plan_capacity
        from worker.factory import PROMPT_TOKENS

        parts = MllamaParts(model)
        try:
            capacity = plan_capacity(
                parts.geometry,
                model.config.vision_config,
                parts.dtype,
                parts.device,
                max_slots=None,
                max_seq_len=self.limits.max_new_tokens + PROMPT_TOKENS,
                memory_fraction=0.9,
            )
        except ValueError:
            return 0
        return capacity.max_slots

    def release_memory(self) -> None:
        """Collect what was dropped (an engine's caches and graphs) and give it back."""
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def lone_latency(self, target) -> dict:
        """Arrival to answer of a lone request of the workload's median answer length (4-tile
        image), on an idle target: the mean of two."""
        from bench.modes import serve_alone

        spec = dataclasses.replace(self.probe_spec, answer_tokens=self.median_answer)
        runs = [serve_alone(target, spec, data)[0] for data in self.fresh_images(2)]
        return {
            "answer_tokens": spec.answer_tokens,
            "tiles": spec.tiles,
            "runs_s": runs,
            "latency_s": sum(runs) / len(runs),
        }

    def drain_estimate(self, key: str, queued: int = 0) -> float:
        """Seconds, roughly, for an engine to answer ``queued`` requests waiting for a slot
        (their prefills: about half a lone 4-tile first token each) and then its longest
        answer (at three times the batch-1 step)."""
        probe = (self.results["modes"].get(key) or {}).get("probe") or {}
        step_ms = max(probe.get("step_ms") or 50.0, 1.0)
        first_ms = probe.get("first_token_ms") or 1000.0
        longest_ms = first_ms + 3 * self.limits.max_new_tokens * step_ms
        return (queued * first_ms / 2 + longest_ms) / 1000.0

    def plan_closed(self, key: str, slots: int, window_s: float, engines: int = 1) -> int:
        """Requests to prepare for a closed loop whose arrivals last ``window_s``: more than
        ``engines`` engines are expected to take in that time (the loop stops at the window)."""
        from bench.report import headline

        b_head = headline(self.results["modes"].get("b") or {}) or {}
        if self.capacity_c:
            rate = 1.3 * self.capacity_c
        elif b_head.get("images_per_s"):
            rate = 4 * b_head["images_per_s"]
        else:
            probe = (self.results["modes"].get(key) or {}).get("probe") or {}
            step_s = max(probe.get("step_ms") or 50.0, 1.0) / 1000.0
            rate = slots / (step_s * self.results["workload"]["mean_answer_tokens"])
        n = max(4 * slots, window_s * rate + 2 * slots) * engines
        return int(min(MAX_CLOSED_REQUESTS * engines, n))

    def closed_and_rates(self, key: str, target, rates: list[float], stop_at: float) -> list:
        """A saturating closed loop (2 x batch in flight), then Poisson arrivals at ``rates``
        x (c)'s saturated capacity. The engine's closed loop lasts ``--closed-window-s`` of
        arrivals; a batch executor's runs ``--batches`` batches."""
        from bench.modes import Schedule, drive
        from bench.report import saturated, summarize_run
        from bench.workload import poisson_arrivals

        a = self.args
        b = target.max_batch
        if target.engine is not None:
            drain = self.drain_estimate(key)
            spare = (
                stop_at
                - time.time()
                - self.drain_estimate(key, queued=2 * b)
                - len(rates) * (a.rate_window_s + drain)
            )
            window = max(1.0, min(a.closed_window_s, spare))
            n = self.plan_closed(key, b, window)
            schedule = Schedule.closed(2 * b, window_s=window)
            log(f"{key}: closed loop of {2 * b} in flight for {window:.0f} s of arrivals")
        else:
            batches = a.batches
            est = self.batch_estimate(key)
            if est:
                room = stop_at - time.time() - len(rates) * (a.rate_window_s + est)
                batches = max(1, min(batches, int(room // est)))
            n = batches * b
            schedule = Schedule.closed(2 * b)
        specs = self.workload.requests(n)
        runs = [drive(target, specs, self.image_of, schedule, name="closed", stop_at=stop_at)]
        capacity = saturated(summarize_run(runs[0].to_dict())).get("images_per_s")
        if key == "c":
            self.capacity_c = capacity
        for fraction in rates:
            base = self.capacity_c or capacity
            if not base:
                break
            if time.time() + a.rate_window_s > stop_at:
                log(f"{key}: no time left for rate x{fraction}")
                break
            rate = fraction * base
            n = max(3, round(rate * a.rate_window_s))
            offsets = poisson_arrivals(n, rate, a.seed)
            arrivals_s = max(offsets[-1], a.rate_window_s) + 1.0
            runs.append(
                drive(
                    target,
                    self.workload.requests(n, start=rate_start(fraction)),
                    self.image_of,
                    Schedule.poisson(offsets, rate),
                    name=f"poisson x{fraction:g} ({rate:.2f}/s)",
                    stop_at=min(stop_at, time.time() + arrivals_s),
                )
            )
        return runs

    def mode_c(self, key: str) -> None:
        from bench.modes import probe_step_ms, warm_up

        mode = self.start_mode(key, "c")
        stop_at = self.mode_stop_at(key)
        b = self.args.engine_slots or self.ensure_batch()
        self.reset_peak()
        t0 = time.time()
        target = self.continuous(self.model, self.processor, b, "(c)")
        try:
            mode.update(
                engine=target.info, batch=target.max_batch, max_wait_ms=self.args.max_wait_ms
            )
            self.engine_slots = target.max_batch
            t = time.perf_counter()
            target.executor.warmup()
            mode["warmup_s"] = time.perf_counter() - t
            # The worker's warm-up image is one tile; the probe's first 4-tile image would
            # pay for first-use costs (kernel selection) otherwise.
            warm_up(target, self.probe_spec, self.fresh_images(1)[0])
            self.save()
            mode["probe"] = probe_step_ms(
                target, self.probe_spec, self.fresh_images(4), k=self.args.probe_tokens
            )
            mode["lone"] = self.lone_latency(target)
            p = mode["probe"]
            log(f"c: batch 1: {p['step_ms']:.1f} ms per decode step (engine timer "
                f"{p.get('engine_step_ms', float('nan')):.1f} ms), first token "
                f"{p['first_token_ms']:.0f} ms; a lone request of {self.median_answer} tokens: "
                f"{mode['lone']['latency_s']:.2f} s")  # fmt: skip
            runs = self.closed_and_rates(key, target, _rates(self.args.rates_c), stop_at)
        finally:
            target = None
            self.release_memory()
        self.summarize(key, runs, t0, True)

    def mode_cb(self, key: str) -> None:
        from bench.modes import batch_target, probe_step_ms, warm_up

        mode = self.start_mode(key, "cb")
        stop_at = self.mode_stop_at(key)
        b = self.ensure_batch()
        self.reset_peak()
        t0 = time.time()
        target = batch_target(self.model, self.processor, self.settings(b), "(cb)")
        t = time.perf_counter()
        target.executor.warmup()
        warm_up(target, self.probe_spec, self.fresh_images(1)[0])
        mode.update(
            warmup_s=time.perf_counter() - t,
            batch=b,
            max_wait_ms=self.args.max_wait_ms,
            engine=target.info,
        )
        mode["probe"] = probe_step_ms(
            target, self.probe_spec, self.fresh_images(4), k=self.args.probe_tokens
        )
        log(f"cb: batch 1: {mode['probe']['step_ms']:.1f} ms per decode step")
        runs = self.closed_and_rates(key, target, [], stop_at)
        self.summarize(key, runs, t0, True)

    def mode_d(self, key: str) -> None:
        """(d): one worker process (the plain ``celery worker`` command)."""
        self.system_mode(key, ())

    def mode_d2(self, key: str) -> None:
        """(d2): ``vlmq worker --gpus`` with two GPUs, one worker each, twice (d)'s requests in
        flight; no probe nor arrival rates (the closed loop is what it is compared on)."""
        visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
        # The workers pin by VLMQ_GPU, which replaces CUDA_VISIBLE_DEVICES: name the same cards.
        gpus = tuple(visible[:2]) if all(g.isdigit() for g in visible[:2]) else ("0", "1")
        self.system_mode(key, gpus)

    def gpu_window(self, gpus: tuple[str, ...]):
        """The sampling window function for ``gpus``: the run's sampler alone, or with a
        sampler per other GPU (the mean utilisation over the GPUs, the largest memory peak);
        and those extra samplers, to stop."""
        from bench.gpu_sampler import GpuSampler

        if self.sampler is None or self.sampler.source != "nvml" or len(gpus) < 2:
            return None, []
        uuids = self.results["device"].get("uuids") or []
        extra = [
            GpuSampler(index=int(g), uuid=uuids[i] if i < len(uuids) else None).start()
            for i, g in enumerate(gpus[1:], start=1)
        ]
        samplers = [self.sampler, *extra]

        def window(t0: float, t1: float) -> dict:
            parts = [s.window(t0, t1) for s in samplers]
            utils = [p["util_mean"] for p in parts if p["util_mean"] is not None]
            if not utils:
                return parts[0]
            return {
                "util_mean": sum(utils) / len(utils),
                "util_max": max(p["util_max"] or 0.0 for p in parts),
                "mem_peak": max(p["mem_peak"] or 0.0 for p in parts),
                "n": sum(p["n"] for p in parts),
                "per_gpu": [p["util_mean"] for p in parts],
            }

        return window, extra

    def system_mode(self, key: str, gpus: tuple[str, ...]) -> None:
        """The whole system: producer -> Redis -> Celery worker(s), load generator in its own
        process; with ``gpus``, ``vlmq worker --gpus`` starts one worker per GPU."""
        from collections import Counter

        from bench.report import headline
        from bench.system import SystemConfig, WorkerProcess, flush_redis, run_loadgen
        from bench.workload import poisson_arrivals

        mode = self.start_mode(key, key)
        stop_at = self.mode_stop_at(key)
        a = self.args
        if self.model_dir is None:
            raise SkipMode("no saved model to load")
        slots = self.engine_slots or self.ensure_batch()
        workers = max(1, len(gpus))
        on_cuda = a.device.startswith("cuda")
        flush_redis(a.redis_url)
        config = SystemConfig(
            redis_url=a.redis_url,
            model_dir=self.model_dir,
            device="cuda" if on_cuda else "cpu",
            precision="bf16" if on_cuda else "fp32",
            max_batch=slots,
            max_wait_ms=a.max_wait_ms,
            out_dir=a.out,
            engine="continuous",
            max_new_tokens=self.limits.max_new_tokens,
            tag=key,
            gpus=gpus,
        )
        mode.update(batch=slots, max_wait_ms=a.max_wait_ms, workers=workers, gpus=list(gpus))
        self.reset_peak()
        t0 = time.time()
        worker = WorkerProcess(config)
        gpu_window, extra_samplers = self.gpu_window(gpus)
        try:
            worker.start()
            ready_s = worker.wait_ready(max(10.0, stop_at - time.time()))
            mode["worker"] = {"ready_s": ready_s, **worker.timings()}
            if gpus:
                mode["worker"]["nodes"] = sorted(set(worker.ready_nodes()))
            mode["engine"] = {"engine": config.engine}
            log(f"{key}: {workers} worker(s) ready in {ready_s:.1f} s ({worker.timings()})")
            self.save()
            source = "c" if (self.results["modes"].get("c") or {}).get("probe") else "d"
            drain = self.drain_estimate(source)
            rate_fractions = [] if gpus else _rates(a.rates_d)
            rates_time = len(rate_fractions) * (a.rate_window_s + drain)
            # 10 s: the probe's six lone requests and the worker's warm shutdown.
            spare = (
                stop_at
                - time.time()
                - 10.0
                - self.drain_estimate(source, queued=2 * slots)
                - rates_time
            )
            window = max(1.0, min(a.closed_window_s, spare))
            timeout = max(30.0, stop_at - time.time() + 60)
            runs = [
                {"name": "closed", "schedule": "closed",
                 "n": self.plan_closed(key, slots, window, engines=workers),
                 "concurrency": 2 * slots * workers, "window_s": window,
                 "max_s": max(1.0, stop_at - time.time())},
            ]  # fmt: skip
            if not gpus:
                runs.insert(0, {"name": "probe", "schedule": "probe", "k": a.probe_tokens,
                                "index": self.probe_spec.index, "repeats": 2,
                                "lone_tokens": self.median_answer})  # fmt: skip
            logs, probe = run_loadgen(
                config,
                self.workload.to_dict(),
                runs,
                stop_at=stop_at + 30,
                timeout_s=timeout,
                alive=worker.alive,
            )
            mode["probe"] = probe
            if probe and probe.get("lone_s"):
                mode["lone"] = {
                    "answer_tokens": self.median_answer,
                    "tiles": self.probe_spec.tiles,
                    "latency_s": probe["lone_s"],
                }
            capacity = self.capacity_c
            if capacity is None and logs:
                from bench.report import saturated, summarize_run

                capacity = saturated(summarize_run(logs[0].to_dict())).get("images_per_s")
            rate_runs = []
            for fraction in rate_fractions:
                if not capacity or time.time() + a.rate_window_s > stop_at:
                    break
                rate = fraction * capacity
                n = max(3, round(rate * a.rate_window_s))
                arrivals_s = max(poisson_arrivals(n, rate, a.seed)[-1], a.rate_window_s) + 1.0
                rate_runs.append(
                    {
                        "name": f"poisson x{fraction:g} ({rate:.2f}/s)",
                        "schedule": "poisson",
                        "rate": rate,
                        "n": n,
                        "start": rate_start(fraction),
                        "max_s": min(arrivals_s, max(1.0, stop_at - time.time())),
                        "seed": a.seed,
                    }
                )
            if rate_runs:
                more, _ = run_loadgen(
                    dataclasses.replace(config, tag="d-rates"),
                    self.workload.to_dict(),
                    rate_runs,
                    stop_at=stop_at + 30,
                    timeout_s=timeout,
                    alive=worker.alive,
                )
                logs += more
        finally:
            code = worker.stop(30.0)
            mode.setdefault("worker", {})["exit_code"] = code
            for sampler in extra_samplers:
                sampler.stop()
        served = Counter(r.get("worker") for run in logs for r in run.records if r.get("worker"))
        mode["tasks_per_worker"] = dict(served)
        self.summarize(key, logs, t0, False, gpu_window)
        steady = ((headline(mode) or {}).get("steady") or {}) if gpu_window else {}
        if steady.get("window"):
            mode["gpu_util_per_gpu"] = gpu_window(*steady["window"]).get("per_gpu")

    def mode_quant(self, key: str) -> None:
        import torch

        from bench.model_factory import weight_bytes
        from worker.model.loading import load_model

        mode = self.start_mode(key, key)
        if not self.args.device.startswith("cuda"):
            raise SkipMode("quantized weights need a CUDA GPU (bitsandbytes)")
        if self.model_dir is None:
            raise SkipMode("no saved model to load")
        stop_at = self.mode_stop_at(key)
        self.free_model()
        self.reset_peak()
        t0 = time.time()
        t = time.perf_counter()
        # Held on self (not in locals) so free_model() really frees it, even after an error.
        self.model, self.processor = load_model(str(self.model_dir), precision=key, device="cuda")
        torch.cuda.synchronize()
        mode["load_s"] = time.perf_counter() - t
        wb = weight_bytes(self.model)
        mode.update(weight_bytes=wb["total"], decode_weight_bytes=wb["decode"])
        log(f"{key}: loaded in {mode['load_s']:.1f} s, weights {wb['total'] / 1e9:.2f} GB")
        try:
            runs = self._quant_runs(key, mode, stop_at)
            self.summarize(key, runs, t0, True)
        finally:
            self.free_model()

    def _quant_target(self, key: str, mode: dict):
        """The worker's default executor (the continuous engine) on these weights; the batch
        executor when the engine cannot serve them (``mode["engine_fallback"]`` says why)."""
        from bench.modes import batch_target, serve_alone

        b = self.engine_slots or self.ensure_batch()
        try:
            target = self.continuous(self.model, self.processor, b, f"({key})", precision=key)
            target.executor.warmup()
            # The executor's warm-up drops a failed answer: ask for one (4 tiles) and check it.
            serve_alone(target, self.probe_spec_of(3), self.fresh_images(1)[0])
            return target
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc)[:300]}"
        target = None
        self.release_memory()
        log(f"{key}: the continuous engine cannot serve these weights ({reason}); "
            "falling back to the batch executor")  # fmt: skip
        mode["engine_fallback"] = reason
        target = batch_target(self.model, self.processor, self.settings(b, key), f"({key})")
        target.executor.warmup()
        serve_alone(target, self.probe_spec_of(3), self.fresh_images(1)[0])
        return target

    def _quant_runs(self, key: str, mode: dict, stop_at: float) -> list:
        from bench.modes import Schedule, drive, probe_step_ms

        target = self._quant_target(key, mode)
        try:
            mode.update(engine=target.info, batch=target.max_batch)
            mode["probe"] = probe_step_ms(
                target, self.probe_spec, self.fresh_images(4), k=self.args.probe_tokens
            )
            step = mode["probe"]["step_ms"]
            log(f"{key}: batch 1: {step:.1f} ms per decode step ({target.info['engine']})")
            if target.engine is not None:
                return self.closed_and_rates(key, target, [], stop_at)
            n = self.args.requests_quant or target.max_batch
            est = self.batch_estimate(key)
            bf16_probe = (self.results["modes"].get("cb") or {}).get("probe") or {}
            if est and bf16_probe.get("step_ms"):
                # The bf16 batch estimate, scaled by this precision's step-time ratio.
                est *= max(1.0, step / bf16_probe["step_ms"])
                room = stop_at - time.time()
                if est > room and n > 2:
                    n = max(2, int(n * room / est))
                    log(f"{key}: {n} requests fit the budget (a batch takes about {est:.0f} s)")
            specs = self.workload.requests(n)
            schedule = Schedule.closed(2 * target.max_batch)
            return [drive(target, specs, self.image_of, schedule, name="closed", stop_at=stop_at)]
        finally:
            target = None
            self.release_memory()

    # -- the run -----------------------------------------------------------------------
    def run(self) -> int:
        self.setup()
        self.prepare_workload()
        self.preflight()
        self.measure_bandwidth()
        modes = self.args.modes
        if self.needs_inprocess() or (self.needs_saved() and self.args.model == "tiny"):
            self.load_inprocess_model()
        # Saved before the engine fuses the in-process model's weights in place.
        if self.needs_saved():
            self.results.setdefault("model", {"kind": self.args.model})
            saved = mf_saved_kind(self.model_dir) == self.args.model
            least = min(MIN_START[k] for k in SAVED_MODES if k in self.active())
            if not saved and not self.args.smoke and self.left() < least + 45:
                for key in SAVED_MODES:
                    self.skips.setdefault(key, "deadline: no time left to save the model")
            else:
                try:
                    self.save_model_for_loading()
                except Exception as exc:
                    log(f"saving the model failed: {type(exc).__name__}: {exc}")
                    self.results["model"]["save_error"] = f"{type(exc).__name__}: {exc}"
                    for key in SAVED_MODES:
                        self.skips.setdefault(key, f"the model could not be saved: {exc}")
        in_process = (("a", self.mode_a), ("b", self.mode_b), ("c", self.mode_c),
                      ("cb", self.mode_cb))  # fmt: skip
        for key, fn in in_process:
            if key in modes:
                self.run_mode(key, fn)
        self.free_model()
        if "d" in modes:
            self.run_mode("d", self.mode_d)
        if "d2" in modes:
            self.run_mode("d2", self.mode_d2)
        for key in ("nf4", "int8"):
            if key in modes:
                self.run_mode(key, self.mode_quant)
        return self.finish()

    def finish(self) -> int:
        from bench import report

        self.results["meta"]["finished"] = time.time()
        self.results["meta"]["wall_s"] = time.time() - self.t_start
        if self.sampler is not None:
            self.sampler.stop()
        self.save()
        assert self.json_path is not None
        self.json_path.with_suffix(".md").write_text(report.markdown(self.results))
        print(report.console(self.results), flush=True)
        log(f"results: {self.json_path} and {self.json_path.with_suffix('.md')}")
        try:
            from bench.plot import plot_all

            for path in plot_all(self.json_path):
                log(f"plot: {path}")
        except ImportError as exc:
            log(f"no plots here ({exc}); draw them with: python -m bench.plot {self.json_path}")
        except Exception as exc:
            log(f"plotting failed ({type(exc).__name__}: {exc}); the JSON is complete")
        failed = [k for k, m in self.results["modes"].items() if m.get("status") == "failed"]
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
        return bench.run()
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
