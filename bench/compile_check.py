"""The project's Triton kernels compiled ahead of time, without a GPU.

    python -m bench.compile_check [--out docs/bench] [--name NAME]   # needs Triton, not a GPU

Each kernel at each tile shape the worker or a bench may launch is compiled for sm_90 (Hopper)
and sm_89 (Ada) as a JIT launch would specialise it (pointers and strides divisible by 16;
without that, loads compile scalar and nothing is pipelined) and the cubin is read with the
``cuobjdump`` Triton bundles: registers a thread, bytes spilled to the stack, shared memory a
block against the card's limit. The fp8 GEMM is compiled at its listed stages and at those
:func:`~worker.model.fp8_tiles.stages_that_fit` launches. This says whether a kernel fits a
card and how it compiles, not how fast it runs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.report import write_table
from bench.vision_attention import CANDIDATE_TILES
from worker.engine import tile_attention
from worker.model import fp8_kernel
from worker.model.fp8_tiles import ALL_GEMV_TILES, ALL_MATMUL_TILES, stages_that_fit

#: Shared memory a block may use, bytes (Triton's limit), per compute capability.
SHARED_LIMIT = {90: 232448, 89: 101376}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

#: The runtime arguments' types of each kernel (the others are its constexprs).
ATTENTION_ARGS = {
    "qkv_ptr": "*bf16", "o_ptr": "*bf16", "length": "i32", "real": "i32", "stride_b": "i32",
    "stride_s": "i32", "stride_ob": "i32", "stride_os": "i32", "scale_log2": "fp32",
}  # fmt: skip
GEMM_ARGS = {
    "q_ptr": "*fp8e4nv", "q_scale_ptr": "*fp32", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32",
    "y_ptr": "*bf16", "M": "i32", "K": "i32", "stride_q": "i32", "stride_w": "i32",
    "stride_y": "i32",
}  # fmt: skip
GEMV_ARGS = {
    "x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "y_ptr": "*bf16",
    "K": "i32", "stride_w": "i32",
}  # fmt: skip


def compile_for(
    fn: Any, args: dict[str, str], constexprs: dict[str, Any], warps: int, stages: int, cc: int
) -> dict[str, int]:
    """Registers, spilled bytes and shared memory of ``fn`` compiled for compute capability
    ``cc``."""
    names = fn.arg_names
    signature = {name: args.get(name, "constexpr") for name in names}
    aligned = [n for n, t in args.items() if t.startswith("*") or n.startswith("stride")]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    kernel = triton.compile(
        source, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps, "num_stages": stages}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage[:200]}")
    return {
        "registers": int(found.group(1)),
        "spilled_bytes": int(found.group(2)),
        "shared_bytes": kernel.metadata.shared,
    }


def rows() -> list[dict]:
    out = []

    def add(kernel: str, tiles: str, cc: int, stages: int, usage: dict[str, int]) -> None:
        limit = SHARED_LIMIT[cc]
        out.append({"kernel": kernel, "tiles": tiles, "cc": cc, "stages": stages, **usage,
                    "shared_limit": limit, "fits": usage["shared_bytes"] <= limit})  # fmt: skip
        print(json.dumps(out[-1]), flush=True)

    for cc in SHARED_LIMIT:
        for t in CANDIDATE_TILES:
            usage = compile_for(
                tile_attention._tile_attention_kernel, ATTENTION_ARGS,
                {"HEADS": 16, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, t.warps, t.stages, cc,
            )  # fmt: skip
            add("vision attention", f"{t.block_m}x{t.block_n} w{t.warps}", cc, t.stages, usage)
        for t in ALL_MATMUL_TILES:
            for block_m in (16, 32, 64):
                fitted = stages_that_fit(t, block_m, SHARED_LIMIT[cc])
                for stages in sorted({t.stages, fitted}, reverse=True):
                    usage = compile_for(
                        fp8_kernel._fp8_matmul_kernel, GEMM_ARGS,
                        {"BLOCK_M": block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k},
                        t.warps, stages, cc,
                    )  # fmt: skip
                    label = f"{block_m}x{t.block_n}x{t.block_k} w{t.warps}"
                    add("fp8 GEMM" + (" (launched)" if stages == fitted else ""), label, cc,
                        stages, usage)  # fmt: skip
        for t in ALL_GEMV_TILES:
            usage = compile_for(
                fp8_kernel._fp8_gemv_kernel, GEMV_ARGS,
                {"BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "FP8_MAX": 448.0, "MIN_AMAX": 1e-12},
                t.warps, t.stages, cc,
            )  # fmt: skip
            add("fp8 GEMV", f"{t.block_n}x{t.block_k} w{t.warps}", cc, t.stages, usage)
    return out


def to_markdown(results: dict) -> str:
    lines = [
        f"# Triton kernels compiled ahead of time: Triton {results['triton']}",
        "",
        "| kernel | tiles | sm | stages | registers | spilled bytes | shared KiB | limit KiB "
        "| fits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['kernel']} | {r['tiles']} | {r['cc']} | {r['stages']} | {r['registers']} | "
            f"{r['spilled_bytes']} | {r['shared_bytes'] / 1024:.0f} | "
            f"{r['shared_limit'] / 1024:.0f} | {'yes' if r['fits'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_check", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    results = {"triton": triton.__version__, "rows": rows()}
    name = args.name or f"compile-check-{time.strftime('%Y-%m-%d')}"
    write_table(args.out, name, results, to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
