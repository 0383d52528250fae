"""Admission, part by part, on the worker's own modules: the vision tower per real tile count
against HF's padded encoder and against its compute floor, the projector + cross K/V, the text
prefill, SDPA backends at the tower's shapes, the tower's kernels by kind, bf16 agreement of
the cross-attention states, and issue 10's admission goals.

    python -m bench.admission [--model 11b] [--out docs/bench] [--name NAME]

Every shape is run once before it is timed (warm: cuDNN plans, autotuning and graph capture
happen outside the timings). Times are CUDA-event medians of ``--reps`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.model_factory import build_config, build_random_model
from bench.profile_decode import kernel_table
from worker.engine.images import ImageEncoder, ImageJob, PhaseClock
from worker.engine.inputs import PreparedRequest
from worker.engine.parts import MllamaParts
from worker.engine.prefill import TextPrefill
from worker.engine.slots import SlotCache
from worker.engine.timing import median_cuda_ms
from worker.engine.vision import VisionGraphs, VisionTower

#: An aspect-ratio id of the processor's grids for each real tile count (1x1, 1x2, 1x3, 2x2).
RATIO_ID = {1: 1, 2: 2, 3: 3, 4: 6}


def encode(encoder: ImageEncoder, jobs: list[ImageJob]) -> list[PhaseClock]:
    """Launch every chunk of ``jobs`` at once (alone on the GPU here); one clock per chunk."""
    return [encoder.encode_chunk(chunk) for chunk in encoder.chunks(jobs)]


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = median_cuda_ms(lambda: a @ b, 10)
    return 2 * n**3 / (ms / 1000) / 1e12


def vision_flops(config, tiles: int) -> dict[str, float]:
    """FLOPs of encoding ``tiles`` real tiles alone (no padding tile, no padding patch), and of
    their projector and cross K/V projections."""
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2 + 1
    tokens = tiles * patches
    h, inner = v.hidden_size, v.intermediate_size
    layers = v.num_hidden_layers + v.num_global_layers
    gemms = 2 * tokens * (4 * h * h + 2 * h * inner) * layers
    attention = 4 * tokens * tokens * h * layers
    conv = 2 * tokens * 3 * v.patch_size**2 * h
    kv_out = (
        2
        * len(t.cross_attention_layers)
        * t.num_key_value_heads
        * (t.hidden_size // t.num_attention_heads)
    )
    cross = 2 * tokens * v.vision_output_dim * t.hidden_size + 2 * tokens * t.hidden_size * kv_out
    return {"vision": gemms + attention + conv, "cross_kv": cross}


def pixels(config, tiles: int, batch: int, device: torch.device, seed: int = 0):
    v = config.vision_config
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, v.max_num_tiles, 3, v.image_size, v.image_size, generator=gen)
    values[:, tiles:] = 0
    mask = torch.zeros(batch, v.max_num_tiles, dtype=torch.long)
    mask[:, :tiles] = 1
    ratios = torch.full((batch,), RATIO_ID[tiles], dtype=torch.long)
    return values.to(device), ratios.to(device), mask.to(device)


def hf_states(parts: MllamaParts, values, ratios, mask) -> torch.Tensor:
    out = parts.vision(
        pixel_values=values[:, None].to(parts.dtype),
        aspect_ratio_ids=ratios[:, None],
        aspect_ratio_mask=mask[:, None],
    )
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])


def vision_table(config, parts, reps: int, rate: float) -> list[dict]:
    device = parts.device
    exact = VisionGraphs(VisionTower(parts.vision, skip_padding_tiles=False), use_graphs=True)
    skip = VisionGraphs(VisionTower(parts.vision, skip_padding_tiles=True), use_graphs=True)
    # The same exact tower with SDPA only: the baseline of the attention's choice, same run.
    sdpa = VisionGraphs(
        VisionTower(parts.vision, skip_padding_tiles=False, triton_attention=False),
        use_graphs=True,
    )
    with torch.inference_mode():
        t0 = time.perf_counter()
        exact.capture(config.vision_config.image_size, parts.dtype, device)
        skip.capture(config.vision_config.image_size, parts.dtype, device)
        capture_s = time.perf_counter() - t0
        sdpa.capture(config.vision_config.image_size, parts.dtype, device)
    rows = []
    for tiles in (1, 2, 3, 4):
        flops = vision_flops(config, tiles)
        floor_ms = flops["vision"] / (rate * 1e12) * 1000
        for batch in (1, 4):
            values, ratios, mask = pixels(config, tiles, batch, device)
            runs = {
                "hf_ms": lambda v=values, r=ratios, m=mask: hf_states(parts, v, r, m),
                "exact_eager_ms": lambda v=values, r=ratios, t=tiles: exact.tower(v, r, t),
                "exact_graph_ms": lambda v=values, r=ratios, t=tiles: exact.run(v, r, t),
                "exact_graph_sdpa_ms": lambda v=values, r=ratios, t=tiles: sdpa.run(v, r, t),
                "skip_graph_ms": lambda v=values, r=ratios, t=tiles: skip.run(v, r, t),
            }
            row = {"tiles": tiles, "batch": batch, "floor_ms": floor_ms}
            with torch.inference_mode():
                row.update({key: median_cuda_ms(fn, reps) / batch for key, fn in runs.items()})
            rows.append(row)
            print(
                f"vision tiles={tiles} batch={batch}: floor {floor_ms:.1f} ms, HF "
                f"{row['hf_ms']:.1f}, exact eager {row['exact_eager_ms']:.1f}, exact graph "
                f"{row['exact_graph_ms']:.1f} (SDPA only {row['exact_graph_sdpa_ms']:.1f}), skip "
                f"graph {row['skip_graph_ms']:.1f} ms/image",
                flush=True,
            )
    rows.append({"capture_s": capture_s, "attention": exact.attention_timings})
    return rows


def profile_table(config, parts) -> dict:
    """Kernels of one eager vision call by kind: 4 images of each of 1 and 4 real tiles, exact,
    with the attention the tower chooses at start-up."""
    tower = VisionTower(parts.vision, skip_padding_tiles=False)
    out = {"attention": tower.choose_attention(parts.dtype, parts.device)}
    for tiles in (1, 4):
        values, ratios, _ = pixels(config, tiles, 4, parts.device)
        with torch.inference_mode():
            out[f"{tiles}_tiles_x4"] = table = kernel_table(
                lambda v=values, r=ratios, t=tiles: tower(v, r, t)
            )
        print(
            f"profile {tiles} tiles x4: {table['kernel_ms']:.1f} ms, "
            + ", ".join(f"{k} {v['ms']:.1f}" for k, v in table["by_kind"].items()),
            flush=True,
        )
    return out


def agreement_table(config, parts) -> list[dict]:
    """Relative error (Frobenius) of the projected states of the real tiles against HF's padded
    encoder in fp32: HF bf16 (the bf16 tolerance), the worker's exact and skip towers in bf16,
    each with the attention it chooses at start-up (``kernel``: the shapes run by Triton)."""
    device = parts.device
    fp32_vision = build_fp32_copy(parts.vision)
    exact = VisionTower(parts.vision, skip_padding_tiles=False)
    skip = VisionTower(parts.vision, skip_padding_tiles=True)
    for tower in (exact, skip):
        tower.choose_attention(parts.dtype, device)
    projector = parts.projector
    rows = []
    with torch.inference_mode():
        for tiles in (1, 2, 3, 4):
            values, ratios, mask = pixels(config, tiles, 1, device, seed=tiles)
            out = fp32_vision(
                pixel_values=values[:, None], aspect_ratio_ids=ratios[:, None],
                aspect_ratio_mask=mask[:, None],
            )  # fmt: skip
            hidden = (out[0] if isinstance(out, tuple) else out.last_hidden_state).reshape(
                1, -1, config.vision_config.vision_output_dim
            )
            real = tiles * exact.patches
            reference = F.linear(hidden, projector.weight.float(), projector.bias.float())[:, :real]

            def error(states: torch.Tensor, reference=reference, real=real) -> float:
                got = projector(states)[:, :real].float()
                return float((got - reference).norm() / reference.norm())

            rows.append({
                "tiles": tiles,
                "hf_bf16": error(hf_states(parts, values, ratios, mask)),
                "exact_bf16": error(exact(values, ratios, tiles)),
                "skip_bf16": error(skip(values, ratios, tiles)),
                "kernel": {
                    "exact": (exact.shape(tiles).length, real) in exact.kernel_shapes,
                    "skip": (skip.shape(tiles).length, real) in skip.kernel_shapes,
                },
            })  # fmt: skip
            print(f"agreement {rows[-1]}", flush=True)
    del fp32_vision
    torch.cuda.empty_cache()
    return rows


def build_fp32_copy(vision: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(vision).float()


def sdpa_table(reps: int, device: torch.device) -> list[dict]:
    """One encoder layer's attention (16 heads x 80, batch 4) by SDPA backend."""
    rows = []
    for label, queries, keys in (
        ("4 tiles, real queries", 6404, 6432),
        ("1 tile encoded alone", 1608, 1608),
        ("1 tile of 4, real queries", 1601, 6432),
        ("1 tile of 4, padding queries", 4831, 1601),
    ):
        q = torch.randn(4, 16, queries, 80, dtype=torch.bfloat16, device=device)
        k = torch.randn(4, 16, keys, 80, dtype=torch.bfloat16, device=device)
        v = torch.randn_like(k)
        row = {"shape": label}
        for name, backend in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("default", None),
        ):
            try:
                call = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                if backend is None:
                    row[name] = median_cuda_ms(call, reps)
                else:
                    with sdpa_kernel([backend]):
                        row[name] = median_cuda_ms(call, reps)
            except RuntimeError as exc:
                row[name] = f"n/a ({str(exc)[:40]})"
        rows.append(row)
        print(f"sdpa {row}", flush=True)
    return rows


def admission_parts(config, parts, reps: int) -> dict:
    """The worker's ImageEncoder (tower graphs + projector + cross K/V into slots) on 4 images of
    each tile count, and the text prefill of 8 prompts, per request."""
    device = parts.device
    out = {}
    for skip_tiles in (False, True):
        cache = SlotCache(parts.geometry, 8, 256, parts.dtype, device)
        encoder = ImageEncoder(parts, cache, skip_padding_tiles=skip_tiles, cuda_graphs=True)
        with torch.inference_mode():
            encoder.capture()
        for tiles in (1, 4):
            values, ratios, mask = pixels(config, tiles, 4, device)
            jobs = [
                ImageJob(
                    PreparedRequest(
                        [1],
                        torch.zeros(1, 4, dtype=torch.bool),
                        values[i].cpu(),
                        int(ratios[i]),
                        mask[i].cpu(),
                        f"img{i}",
                    ),
                    (i,),
                )
                for i in range(4)
            ]
            with torch.inference_mode():
                encode(encoder, jobs)  # warm
                torch.cuda.synchronize()
                samples = []
                for _ in range(reps):
                    clocks = encode(encoder, jobs)
                    torch.cuda.synchronize()
                    samples.append((
                        sum(c.ms("start", "vision_end") for c in clocks) / 4,
                        sum(c.ms("vision_end", "end") for c in clocks) / 4,
                    ))  # fmt: skip
            key = f"{'skip' if skip_tiles else 'exact'}_{tiles}tile"
            out[key] = {
                "vision_ms": statistics.median(s[0] for s in samples),
                "projector_cross_kv_ms": statistics.median(s[1] for s in samples),
            }
            print(f"encoder {key}: {out[key]}", flush=True)
        del encoder, cache
        torch.cuda.empty_cache()
    cache = SlotCache(parts.geometry, 8, 256, parts.dtype, device)
    rope = parts.rope_table(256)
    unseen = torch.ones(8, 4, dtype=torch.bool)
    for use_graphs in (False, True):
        with torch.inference_mode():
            prefill = TextPrefill(parts, cache, rope, use_graphs=use_graphs)
            prefill.capture()
            for count in (1, 8):
                args = ([*range(count)], [[*range(10, 50)]] * count,
                        [torch.ones(40, 4, dtype=torch.bool)] * count, unseen[:count])  # fmt: skip
                ms = median_cuda_ms(lambda p=prefill, a=args: p.run(*a), reps)
                key = f"text_prefill_{count}x40_{'graph' if use_graphs else 'eager'}"
                out[f"{key}_ms_per_request"] = ms / count
                print(f"{key}: {ms / count:.2f} ms per request", flush=True)
    return out


def admission_targets(encoder: dict, floors: dict, rate: float) -> list[dict]:
    """Issue 10's admission goals from the encoder part: a request's admission (vision,
    projector + cross K/V, and its share of a graphed prefill of 8 prompts) of 4 tiles over its
    compute floor (<= 1.5x), and of 1 tile over 4 (<= 0.35), for each padding-tile mode."""
    prefill = encoder["text_prefill_8x40_graph_ms_per_request"]

    def admission(mode: str, tiles: int) -> float:
        part = encoder[f"{mode}_{tiles}tile"]
        return part["vision_ms"] + part["projector_cross_kv_ms"] + prefill

    floor4 = (floors[4]["vision"] + floors[4]["cross_kv"]) / (rate * 1e12) * 1000
    rows = []
    for mode in ("exact", "skip"):
        four = admission(mode, 4)
        for target, value, goal in (
            (f"4-tile admission / its floor, {mode}", four / floor4, 1.5),
            (f"1-tile / 4-tile admission, {mode}", admission(mode, 1) / four, 0.35),
        ):
            rows.append({"target": target, "value": round(value, 3), "goal": f"<= {goal}",
                         "pass": value <= goal})  # fmt: skip
            print(f"target {target}: {value:.3f} (goal <= {goal})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__)
    p.add_argument("--model", default="11b", choices=["11b", "mini"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    p.add_argument("--name", default=None)
    p.add_argument("--parts", default="sdpa,vision,encoder,profile,agreement")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    wanted = set(args.parts.split(","))
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    results["matmul_tflops"] = rate = matmul_tflops(device)
    print(f"{results['device']}: bf16 matmul {rate:.0f} TFLOP/s", flush=True)
    if "sdpa" in wanted:
        results["sdpa"] = sdpa_table(args.reps, device)
    config = build_config(args.model)
    model = build_random_model(config, device="cuda", dtype=torch.bfloat16)
    parts = MllamaParts(model)
    if "vision" in wanted:
        results["vision"] = vision_table(config, parts, args.reps, rate)
    if "encoder" in wanted:
        results["encoder"] = admission_parts(config, parts, args.reps)
    if "profile" in wanted:
        results["profile"] = profile_table(config, parts)
    if "agreement" in wanted:
        results["agreement"] = agreement_table(config, parts)
    results["floors"] = floors = {t: vision_flops(config, t) for t in (1, 2, 3, 4)}
    if "encoder" in wanted:
        results["targets"] = admission_targets(results["encoder"], floors, rate)
    name = args.name or f"admission-{time.strftime('%Y-%m-%d')}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
