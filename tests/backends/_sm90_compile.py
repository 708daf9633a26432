"""Compile the GroupNorm+SiLU kernels for an H100/H200 (sm_90a) without a GPU and report, per kernel,
ptxas's registers and spill bytes and the widest global load: ``python -m tests.backends._sm90_compile``.

Run in a process without ``TRITON_INTERPRET`` (the compiler needs real ``JITFunction`` objects);
``test_triton.py`` does that in a subprocess. Prints one JSON object per kernel.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import npu_kernels.backends.triton.group_norm_silu as gns

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")


def compile_kernel(kernel, types: dict, constexprs: dict, num_warps: int, divisible_by_16=()) -> dict:
    """Compile ``kernel``; ``types``: non-i32 argument types; ``constexprs``: values (strides of 1
    too, as Triton's specialisation makes them); pointers and ``divisible_by_16`` get 16-divisibility."""
    signature, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        if param.is_constexpr or param.name in constexprs:
            signature[param.name] = "constexpr"
        else:
            signature[param.name] = types.get(param.name, "i32")
            if signature[param.name].startswith("*") or param.name in divisible_by_16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    values = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    compiled = triton.compile(ASTSource(kernel, signature, values, attrs), target=TARGET,
                              options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(ptx)
        result = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", os.path.join(tmp, "k.ptx"),
                                 "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr)
    widths = [{"v4": 4, "v2": 2}.get(w, 1) * int(bits) // 8
              for w, bits in re.findall(r"ld\.global(?:\.[a-z]+)*?(?:\.(v\d))?\.b(\d+)", ptx)]
    return {"registers": int(re.search(r"Used (\d+) registers", result.stderr).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", result.stderr).group(1)),
            "widest_load_bytes": max(widths, default=0)}


def sdxl_reports(dtype: str = "bf16"):
    """Every kernel with the launch plan of SDXL's 1024 px and 512 px shapes, both layouts."""
    ptr = lambda *names: {n: f"*{dtype}" for n in names}  # noqa: E731
    f32 = lambda *names: {n: "*fp32" for n in names}  # noqa: E731
    scalars = {n: "fp32" for n in ("inv_count", "eps")}
    for channels_last in (False, True):
        ones = {"stride_c": 1} if channels_last else {"stride_s": 1}
        go_ones = {k.replace("stride_", "stride_go_"): v for k, v in ones.items()}
        div = ("S", "stride_n", "stride_go_n", "num_groups", "C") + (
            ("stride_s", "stride_go_s") if channels_last else ("stride_c", "stride_go_c"))
        for channels, spatial in [(320, 128 * 128), (640, 64 * 64), (1280, 32 * 32),
                                  (320, 64 * 64), (640, 32 * 32), (1280, 16 * 16)]:
            cpg = channels // 32
            where = dict(layout="channels_last" if channels_last else "contiguous", channels=channels, spatial=spatial)
            for forward in (True, False):
                plan = gns.launch_plan(1, channels, 32, spatial, channels_last, torch.device("cpu"), forward=forward)
                meta = dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, CPG=cpg, **ones)
                if forward and plan.fused:
                    kernels = [(gns._fwd_fused_kernel, {**ptr("x_ptr", "w_ptr", "b_ptr", "out_ptr"),
                                                        **f32("mean_ptr", "rstd_ptr"), **scalars}, meta)]
                elif forward:
                    kernels = [
                        (gns._fwd_stats_kernel, {**ptr("x_ptr"), **f32("count_ptr", "mean_ptr", "m2_ptr")},
                         dict(BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, CPG=cpg, **ones)),
                        (gns._fwd_apply_kernel, {**ptr("x_ptr", "w_ptr", "b_ptr", "out_ptr"), **scalars,
                                                 **f32("count_ptr", "part_mean_ptr", "m2_ptr", "mean_ptr", "rstd_ptr")},
                         dict(meta, BLOCK_CHUNKS=16)),
                    ]
                else:
                    sums = f32("mean_ptr", "rstd_ptr", "sum_dxhat_ptr", "sum_dxhat_xhat_ptr", "dw_part_ptr", "db_part_ptr")
                    kernels = [
                        (gns._bwd_reduce_kernel, {**ptr("x_ptr", "go_ptr", "w_ptr", "b_ptr"), **sums}, dict(meta, **go_ones)),
                        (gns._bwd_apply_kernel, {**ptr("x_ptr", "go_ptr", "w_ptr", "b_ptr", "gx_ptr", "gw_ptr", "gb_ptr"),
                                                 **sums, **scalars},
                         dict(meta, **go_ones, BLOCK_CHUNKS=16, BLOCK_P=16, BLOCK_K=1)),
                    ]
                for kernel, types, constexprs in kernels:
                    report = compile_kernel(kernel, types, constexprs, plan.num_warps, div)
                    yield dict(where, kernel=kernel.__name__, num_warps=plan.num_warps, **report)


if __name__ == "__main__":
    for line in sdxl_reports():
        print(json.dumps(line), flush=True)
