"""Before any mode: the device and GPU sampling, the bandwidth, the workload, and which
modes this host cannot run."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import redis
import torch
import transformers

from bench import model_factory as mf
from bench.bandwidth import measure_copy_bandwidth
from bench.gpu_sampler import GpuSampler
from bench.progress import log, set_log_file
from bench.state import SAVED_MODES, Bench
from bench.workload import ANSWER_MAX, Workload, mean_answer_tokens, scaled_length
from producer.errors import ConfigurationError
from producer.protocol import Limits
from worker.model.fp8 import check_fp8_device
from worker.settings import QUANTIZED


def setup(bench: Bench) -> None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args = bench.args
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
    bench.results["device"] = device
    date = datetime.date.today().isoformat()
    stem = args.name or f"{'cpu-smoke' if args.smoke else _slug(device['name'])}-{date}"
    args.out.mkdir(parents=True, exist_ok=True)
    bench.json_path = args.out / f"{stem}.json"
    set_log_file(args.out / f"{stem}.log")
    bench.results["meta"] = {
        "command": "python -m bench " + shlex.join(sys.argv[1:]),
        "date": date,
        "started": bench.t_start,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "smoke": args.smoke,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    log(f"device: {device['name']}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; outputs {bench.json_path.with_suffix('.*')}")  # fmt: skip
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    bench.sampler = GpuSampler(
        index=int(visible) if visible.isdigit() else 0, uuid=device.get("uuid")
    )
    if on_cuda:
        bench.sampler.start()
        log(f"GPU sampling: {bench.sampler.source} {bench.sampler.error or ''}")
    else:
        bench.sampler.source = "none (CPU run)"
    bench.save()


def measure_bandwidth(bench: Bench) -> None:
    with bench.phase("bandwidth"):
        on_cuda = bench.args.device.startswith("cuda")
        bw = measure_copy_bandwidth(bench.args.device, (2 << 30) if on_cuda else (128 << 20))
        bench.results["bandwidth"] = bw
        log(f"device-to-device copy: {bw['bytes_per_s'] / 1e9:.0f} GB/s (read + write)")
    bench.save()


def prepare_workload(bench: Bench) -> None:
    a = bench.args
    bench.workload = Workload(
        seed=a.seed, tile_size=mf.TILE_SIZES[a.model], length_scale=a.length_scale
    )
    bench.probe_spec = next(
        (s for s in bench.workload.requests(64) if s.tiles == 4), bench.workload.request(0)
    )
    bench.images: dict[int, bytes] = {}
    bench.median_answer = round(
        statistics.median(s.answer_tokens for s in bench.workload.requests(1000))
    )
    # The engine's slots hold the longest answer (the worker sizes them by this limit).
    longest = max(scaled_length(ANSWER_MAX, a.length_scale), 1 + a.probe_tokens)
    bench.limits = Limits(max_new_tokens=longest)
    bench.results["workload"] = {
        **bench.workload.to_dict(),
        "mean_answer_tokens": mean_answer_tokens(a.length_scale),
        "median_answer_tokens": bench.median_answer,
        "max_new_tokens": longest,
        "probe_request": dataclasses.asdict(bench.probe_spec),
    }


def preflight(bench: Bench) -> None:
    """Before any model is built: which modes this host cannot run, and where the model
    will be saved. Those modes are skipped with the reason; nothing is spent on them."""
    a = bench.args
    on_cuda = a.device.startswith("cuda")
    for key in ("d", "d2"):
        if key not in a.modes:
            continue
        if importlib.util.find_spec("celery") is None:
            bench.skips[key] = "celery is not installed"
        else:
            try:
                redis.Redis.from_url(a.redis_url, socket_connect_timeout=2).ping()
            except (redis.RedisError, ValueError) as exc:
                bench.skips[key] = f"no Redis answers at {a.redis_url} ({exc})"
    count = bench.results["device"].get("count", 0)
    if "d2" in a.modes and on_cuda and count < 2:
        bench.skips.setdefault("d2", f"fewer than 2 GPUs are visible ({count})")
    for key in QUANTIZED:
        if key not in a.modes:
            continue
        missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
        if not on_cuda:
            bench.skips[key] = "quantized weights need a CUDA GPU"
        elif key == "fp8":
            try:
                check_fp8_device(a.device)
            except ConfigurationError as exc:
                bench.skips[key] = str(exc)
        elif missing:
            bench.skips[key] = (
                f"{' and '.join(missing)} not installed (transformers loads bitsandbytes "
                "weights only with both)"
            )
    if bench.needs_saved() and a.model != "tiny":
        need = 23e9 if a.model == "11b" else 1e9
        if a.model_dir is None:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            shm = Path("/dev/shm")
            shm_ok = shm.is_dir() and shutil.disk_usage(shm).free > need and ram - need > 64e9
            base = shm if shm_ok else Path(tempfile.gettempdir())
            bench.model_dir = base / f"vlmq-bench-{a.model}"
        if mf.saved_kind(bench.model_dir) != a.model:
            parent = bench.model_dir if bench.model_dir.exists() else bench.model_dir.parent
            free = shutil.disk_usage(parent).free
            if free < need:
                for key in SAVED_MODES:
                    bench.skips.setdefault(
                        key,
                        f"{free / 1e9:.0f} GB free at {parent}; the model needs {need / 1e9:.0f}",
                    )
    for key, reason in bench.skips.items():
        if key in a.modes:
            log(f"{key} will be skipped: {reason}")
    bench.results["preflight"] = {"skips": bench.skips, "model_dir": str(bench.model_dir)}


def _slug(text: str) -> str:
    text = re.sub(r"^nvidia\s+", "", text.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"
