"""The state of one benchmark run, shared by every phase and mode: the arguments, the
results (saved to JSON after every mode), the deadline, the workload, the loaded model."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench import report
from bench.bandwidth import decode_floor_ms
from bench.drive import warm_shape
from bench.progress import elapsed, log
from worker.settings import QUANTIZED, WorkerSettings

#: Seconds each mode may take at most, model loads included (the run's deadline still rules).
BUDGETS = {"a": 25, "b": 55, "c": 120, "cb": 45, "d": 125, "d2": 100, "nf4": 100, "fp8": 100}
SMOKE_BUDGETS = {"a": 20, "b": 20, "c": 30, "cb": 20, "d": 60, "d2": 60, "nf4": 1, "fp8": 1}
#: Least seconds left on the deadline for a mode to start at all.
MIN_START = {"a": 10, "b": 20, "c": 40, "cb": 20, "d": 70, "d2": 60, "nf4": 50, "fp8": 50}
SMOKE_MIN_START = {"a": 2, "b": 2, "c": 3, "cb": 2, "d": 10, "d2": 10, "nf4": 1, "fp8": 1}
#: The modes that load the saved model.
SAVED_MODES = ("d", "d2", *QUANTIZED)
#: Largest closed loop planned for the engine (its images are made before it starts).
MAX_CLOSED_REQUESTS = 1500


class SkipMode(Exception):
    """A mode that cannot run here or now; the message says why."""


def rates(text: str) -> list[float]:
    """Arrival rates (fractions of capacity) from ``0.5,0.9``."""
    return [float(x) for x in text.split(",") if x.strip()]


def rate_start(fraction: float) -> int:
    """The first workload index of the Poisson run at ``fraction`` x capacity: its own
    requests (and images), the same in (c) and (d)."""
    return 1_000_000 + round(fraction * 1000) * 1000


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
        self.tmp_dir = None
        self.max_batch: int | None = args.max_batch
        self.capacity_c: float | None = None
        self.engine_slots: int | None = None  # the slots (c)'s engine got, for (d)
        self.fresh_count = 0
        self.json_path: Path | None = None
        self.skips: dict[str, str] = {}
        # Set by bench.preparation.prepare_workload:
        self.workload: Any = None
        self.probe_spec: Any = None
        self.images: dict[int, bytes] = {}
        self.median_answer = 0
        self.limits: Any = None

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        """Write the results JSON (ratios and targets recomputed)."""
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

    def image_of(self, spec) -> bytes:
        data = self.images.get(spec.index)
        if data is None:
            data = self.images[spec.index] = self.workload.image_bytes(spec)
        return data

    def probe_spec_of(self, tokens: int):
        """The probe request (4 tiles) with an answer of ``tokens``."""
        return dataclasses.replace(self.probe_spec, answer_tokens=tokens)

    def fresh_images(self, count: int) -> list[bytes]:
        """Images of the probe request's size never used before (no engine can reuse their
        cross-attention cache)."""
        out = []
        for _ in range(count):
            self.fresh_count += 1
            spec = dataclasses.replace(
                self.probe_spec, image_seed=self.probe_spec.image_seed + self.fresh_count
            )
            out.append(self.workload.image_bytes(spec))
        return out

    def settings(self, slots: int, precision: str | None = None):
        """The worker settings the in-process executors are built from (as the worker does)."""
        on_cuda = self.args.device.startswith("cuda")
        return WorkerSettings(
            model=str(self.model_dir or f"bench-{self.args.model}"),
            precision=precision or ("bf16" if on_cuda else "fp32"),
            device="cuda" if on_cuda else "cpu",
            max_batch_size=slots,
            max_wait_ms=self.args.max_wait_ms,
            padding_tiles=self.args.padding_tiles,
            gpu_memory_gib=self.args.gpu_memory_gib,
            limits=self.limits,
        )

    def active(self) -> list[str]:
        return [m for m in self.args.modes if m not in self.skips]

    def needs_inprocess(self) -> bool:
        return any(m in self.active() for m in ("a", "b", "c", "cb"))

    def needs_saved(self) -> bool:
        return any(m in self.active() for m in SAVED_MODES)

    def peak_memory(self, t0: float, t1: float, inprocess: bool, window=None) -> dict:
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
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def summarize(self, key: str, runs: list, t0: float, inprocess: bool, window=None) -> None:
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
        full = mode.get("probe_full")
        if full and full.get("mean_position") is not None:  # where its timed steps sit
            kw["context_tokens"] = (h.get("mean_prompt_tokens") or 40) + full["mean_position"]
            mode["floor"]["full_batch"] = decode_floor_ms(batch=full["rows"], **kw)

    def start_mode(self, key: str, label: str) -> dict:
        mode = {
            "label": report.MODE_LABELS.get(key, label),
            "status": "running",
            "started": time.time(),
        }
        self.results["modes"][key] = mode
        if key in self.skips:
            raise SkipMode(self.skips[key])
        need = (SMOKE_MIN_START if self.args.smoke else MIN_START)[key]
        if self.left() < need:
            raise SkipMode(f"deadline: {self.left():.0f} s left, this mode needs {need} s or more")
        return mode

    def run_mode(self, key: str, fn: Callable[[Bench, str], None]) -> None:
        """Run mode ``key`` as ``fn(self, key)``: a skip, a failure or an interrupt is recorded
        in its results, which are saved in any case."""
        t0 = time.time()
        try:
            with self.phase(f"mode {key}"):
                fn(self, key)
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

    def warm_shape(self, mode: dict, target: Any, batch: int) -> None:
        """Run the full batch shape the mode will time, untimed, before timing it; its cold
        first run's cost goes to ``mode["warm"]``, apart from the timed figures."""
        mode["warm"] = warm_shape(target, self.probe_spec, self.fresh_images(batch))
        w = mode["warm"]
        log(
            f"{target.label}: a batch of {batch} (2 tokens) took {w['cold_s']:.2f} s cold, "
            f"{w['warm_s']:.2f} s warm: {w['cold_cost_s']:.2f} s of one-time cost, untimed"
        )
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

    def batch_estimate(self, key: str) -> float | None:
        """Seconds one full static batch takes, by the fit probe (if it ran)."""
        fit = self.results.get("batch_fit")
        if not fit or "step_ms" not in fit:
            return None
        longest = max(s.answer_tokens for s in self.workload.requests(self.max_batch or 1))
        return fit["first_token_s"] + longest * fit["step_ms"] / 1000.0

    def release_memory(self) -> None:
        """Collect what was dropped (an engine's caches and graphs, a model) and give it back."""
        gc.unfreeze()  # the worker's factory froze what was resident then, the dropped included
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

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
        b_head = report.headline(self.results["modes"].get("b") or {}) or {}
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
