"""Host time per eager call: each op and swapped layer vs what stock PyTorch/diffusers/PEFT runs.

At SDXL's batch 1 the GPU step is launch-bound: the host's time per call, not the kernels', sets the
pace. Tiny inputs make the kernels negligible, so the time per call here is the Python and dispatch
cost of the call (on a GPU the launches are asynchronous; one synchronisation per round). Rows:
``train`` (forward + backward, inputs needing gradients, as in LoRA training) and ``inference``
(forward under ``no_grad``), each ``stock`` and ``npu_kernels`` (auto backend, as ``optimize`` runs).

``extra_info``: ``host_us_per_call`` (fastest round's time per call: the least disturbed by other
load on the machine) and ``ratio_vs_stock`` (stock's over ours, same layer, mode and run; above 1
is faster than stock)::

    python -m pytest benchmarks/test_bench_host_time.py --benchmark-only -s
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import npu_kernels
from tests import reference

CALLS_PER_ROUND = 200
ROUNDS = 15
_STOCK_US: dict[tuple[str, str], float] = {}  # (layer, mode) -> stock's host µs per call


def _leaf(*shape: int, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, device=device).requires_grad_()


def _stock_geglu(x: torch.Tensor) -> torch.Tensor:
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def _lora_layer(device: torch.device) -> nn.Module:
    """A PEFT LoRA Linear (rank 4) over a frozen Linear, lora_B non-zero as after some training."""
    from peft import LoraConfig, inject_adapter_in_model

    model = nn.Sequential(nn.Linear(16, 16)).to(device).requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0"]), model)
    nn.init.normal_(model[0].lora_B["default"].weight)
    return model


def _lora_attention(device: torch.device) -> nn.Module:
    """diffusers' self-attention (``Attention``, ``AttnProcessor2_0``) with LoRA r4 on q/k/v/out."""
    from diffusers.models.attention_processor import Attention
    from peft import LoraConfig, inject_adapter_in_model

    model = nn.Sequential(Attention(32, heads=2, dim_head=16)).to(device).requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    return model


def _case(layer: str, impl: str, device: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    """``(call, inputs)``: the layer's forward as stock or npu_kernels runs it."""
    ours = impl == "npu_kernels"
    if layer == "geglu":
        return (npu_kernels.geglu if ours else _stock_geglu), [_leaf(1, 4, 2 * 8, device=device)]
    if layer == "group_norm_silu":
        inputs = [_leaf(1, 8, 2, 2, device=device), _leaf(8, device=device), _leaf(8, device=device)]
        if ours:
            return (lambda x, w, b: npu_kernels.group_norm_silu(x, 4, w, b)), inputs
        return (lambda x, w, b: F.silu(F.group_norm(x, 4, w, b))), inputs
    if layer in ("flash_attention", "cross_attention"):
        kv = 16 if layer == "flash_attention" else 7
        inputs = [_leaf(1, 2, 16, 8, device=device), _leaf(1, 2, kv, 8, device=device), _leaf(1, 2, kv, 8, device=device)]
        return (getattr(npu_kernels, layer) if ours else F.scaled_dot_product_attention), inputs
    # Modules: a LoRA self-attention, PEFT's LoRA Linear, frozen Linear and Conv2d, patched by optimize().
    if layer == "lora_attention":
        module, x = _lora_attention(device), _leaf(1, 16, 32, device=device)
    elif layer == "lora_linear":
        module, x = _lora_layer(device), _leaf(1, 4, 16, device=device)
    elif layer == "frozen_linear":
        module, x = nn.Linear(16, 16).to(device).requires_grad_(False), _leaf(1, 4, 16, device=device)
    else:
        module, x = nn.Conv2d(8, 8, 3, padding=1).to(device).requires_grad_(False), _leaf(1, 8, 4, 4, device=device)
    if ours:
        npu_kernels.optimize(module)
    return module, [x]


LAYERS = [
    "geglu", "group_norm_silu", "flash_attention", "cross_attention",
    "lora_attention", "lora_linear", "frozen_linear", "frozen_conv2d",
]


def _assert_agrees_with_stock(layer: str, device: torch.device) -> None:
    """Ours and stock built from the same seed (same weights and inputs): output, input gradients and
    trainable parameters' gradients equal per element at fp32's tolerance."""
    runs = []
    for impl in ("stock", "npu_kernels"):
        torch.manual_seed(0)
        call, inputs = _case(layer, impl, device)
        params = [p for p in getattr(call, "parameters", lambda: [])() if p.requires_grad]
        out = call(*inputs)
        runs.append((out, torch.autograd.grad(out, inputs + params, torch.ones_like(out))))
    (stock_out, stock_grads), (out, grads) = runs
    reference.assert_close(out, stock_out, torch.float32, f"{layer} output")
    assert len(grads) == len(stock_grads)
    for i, (got, want) in enumerate(zip(grads, stock_grads)):
        reference.assert_close(got, want, torch.float32, f"{layer} gradient {i}")


@pytest.mark.parametrize("impl", ["stock", "npu_kernels"])
@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("layer", LAYERS)
def test_host_time_per_call(benchmark, device, layer, mode, impl):
    if impl == "npu_kernels" and mode == "train":
        _assert_agrees_with_stock(layer, device)
    call, inputs = _case(layer, impl, device)
    params = [p for p in getattr(call, "parameters", lambda: [])() if p.requires_grad]

    def run_round() -> None:
        if mode == "inference":
            with torch.no_grad():
                for _ in range(CALLS_PER_ROUND):
                    call(*inputs)
        else:
            for _ in range(CALLS_PER_ROUND):
                call(*inputs).sum().backward()
            for t in inputs + params:
                t.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"host time {layer} {mode}"
    benchmark.extra_info.update(layer=layer, mode=mode, impl=impl, device=device.type, calls_per_round=CALLS_PER_ROUND)
    benchmark.pedantic(run_round, rounds=ROUNDS, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    us_per_call = benchmark.stats.stats.min / CALLS_PER_ROUND * 1e6
    if impl == "stock":
        _STOCK_US[(layer, mode)] = us_per_call
    stock = _STOCK_US.get((layer, mode))
    benchmark.extra_info.update(host_us_per_call=us_per_call, ratio_vs_stock=stock / us_per_call if stock else None)
    print(f"\n{layer:16s} {mode:9s} {impl:11s} {us_per_call:7.1f} µs/call"
          + (f"  stock/ours {stock / us_per_call:.2f}x" if stock and impl != "stock" else ""))


def test_interleaved_unet_step_runs_every_variant():
    """The interleaved A/B script (``python -m benchmarks.interleaved_unet_step``) at its smallest."""
    from benchmarks.interleaved_unet_step import VARIANTS, main

    medians = main(["--blocks", "1", "--steps", "1"])
    assert set(medians) == set(VARIANTS) and all(seconds > 0 for seconds in medians.values())
