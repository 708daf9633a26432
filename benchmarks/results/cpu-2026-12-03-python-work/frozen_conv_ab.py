"""Host time per training call of a small frozen Conv2d: stock, the old eager path (a Python autograd.Function,
`_FrozenConv2d`) and the new one (autograd's own node, input dropped by a saved-tensor hook); interleaved rounds.

    python benchmarks/results/cpu-2026-12-03-python-work/frozen_conv_ab.py [ROUNDS]
"""
import statistics
import sys
import time
from pathlib import Path
from types import MethodType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from npu_kernels import frozen_layers  # noqa: E402


def old_forward(self, x):
    return frozen_layers._FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


conv = torch.nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
x = torch.randn(1, 8, 4, 4, requires_grad=True)
FORWARDS = {"stock": None, "old": old_forward, "new": frozen_layers.conv2d_forward}
times = {name: [] for name in FORWARDS}
grads = {}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 21
for r in range(rounds):
    names = list(FORWARDS)
    for name in names[r % 3:] + names[:r % 3]:
        conv.__dict__.pop("forward", None)
        if FORWARDS[name] is not None:
            conv.forward = MethodType(FORWARDS[name], conv)
        start = time.perf_counter()
        for _ in range(200):
            x.grad = None
            conv(x).sum().backward()
        times[name].append((time.perf_counter() - start) / 200 * 1e6)
        grads[name] = x.grad.clone()
assert torch.equal(grads["old"], grads["stock"]) and torch.equal(grads["new"], grads["stock"])
median = {name: statistics.median(values) for name, values in times.items()}
print(" ".join(f"{name} {value:.1f} µs/call" for name, value in median.items()),
      f"| new/old {median['new'] / median['old']:.3f}, stock/new {median['stock'] / median['new']:.3f}")
