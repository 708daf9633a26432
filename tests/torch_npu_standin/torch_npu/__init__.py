"""A stand-in ``torch_npu`` for tests on machines without an Ascend NPU (and without CANN).

It is NOT torch_npu: it implements, in plain PyTorch on any device, the ops that
``npu_kernels.backends.npu`` calls (``npu_fusion_attention`` (+grad), ``npu_fusion_attention_v3`` and
``npu_fusion_attention_grad_v3``, ``npu_fused_infer_attention_score``, ``npu_geglu`` (+grad),
``npu_group_norm_silu``, ``npu_group_norm_swish`` (+grad)), so that the adapters can be checked for
*how* they call torch_npu (which op, layout, head_num, scale, keep_prob, mask polarity, GELU index,
inner_precise, ...). Nothing here says anything about the speed or numerics of the real kernels.

**Signatures from the real torch_npu.** Every call is bound against the schema of the emulated
release (:data:`RELEASE`, one of :data:`RELEASES`), read from ``torch_npu_schemas.json``, which
``tools/torch_npu_schemas.py`` extracts from the PyPI wheels (``torch_npu/csrc/aten/*native_functions*.yaml``
and the doc blocks of ``torch_npu/_op_plugin_docs.py``): argument names, keyword-only and required
arguments, argument types and the number of outputs. :func:`use_release` switches the release and
removes the ops it lacks. Every op records its call in :data:`CALLS` (all arguments by schema name).

**Rules from the shipped docs** (each failure names the release and the op's doc block):

* the op's chip list: its "支持的型号" section in the release's block (for
  ``npu_fused_infer_attention_score``, which has none, the products its dtype lines name); bfloat16 on
  Atlas A2 only (A2/A3 for the inference op). :data:`SOC_VERSION` is the emulated chip ("Ascend910B3",
  Atlas A2; "Ascend910A"/"Ascend910ProB" Atlas training series; "Ascend910_93xx" A3; "Ascend310P3" Atlas
  inference series);
* ``npu_fusion_attention`` "该接口仅在训练场景下使用" (a call without a gradient fails) and, where the
  release's block says it (2.7.1+), "该接口暂不支持图模式, 不支持aclgraph" (a call while
  ``torch.compiler.is_compiling()`` fails: an emulated "compiled on NPU" call);
* the input checks of each op (dtypes, shapes, layouts, mask shapes; ``npu_group_norm_silu`` input of
  more than one dimension, weight/bias "必选输入"; ``npu_group_norm_swish`` 2..8-D and weight/bias of the
  input's dtype; ``npu_fused_infer_attention_score`` float16/bfloat16, D <= 512, contiguous inputs);
* inside :func:`emulated_device` (a ``TorchDispatchMode``), aclnnGroupNormBackward's dtype rule
  (gradOut, input, mean, rstd of one dtype, CANN 8.0 operator API) on every
  ``aten.native_group_norm_backward``, the operator an NPU runs there; CPU ATen itself accepts float32
  statistics with a bfloat16 gradient.

**Maths in the device's working precision, not the float64 reference's way**: attention's
probabilities are rounded to the input dtype before ``P·V``; GroupNorm normalises with the statistics
it returns in the input's dtype; GEGLU multiplies the halves in the input's dtype. The formula used
for ``pse`` is the documented ``scale * (pse + q kᵀ)`` (the adapters pass no ``pse``).

Not emulated (``NotImplementedError``, so an adapter relying on it fails loudly): dropout
(``keep_prob < 1``), sparse modes other than 0, the TND/varlen layout, prefix, the inference op's
``pse_shift`` and quantisation arguments. Whether torch_npu registers autograd for ``_v3`` is not
documented: the stand-in registers none (the adapter calls ``npu_fusion_attention_grad_v3``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

__version__ = "0.0.0+standin"
IS_STANDIN = True

#: Every call of a stand-in op, oldest first: ``{"name", "kwargs", "shapes", "dtypes"}``.
#: ``kwargs`` holds every documented parameter by name (positional arguments mapped to their
#: names, defaults filled in); tensors are stored detached (same storage as what was passed).
CALLS: list[dict[str, Any]] = []

#: Emulates a torch_npu/CANN release whose ``npu_fusion_attention`` takes float32 (6.0.RC3+ docs).
#: Set to False to emulate the older fp16/bf16-only release.
SUPPORTS_FP32_ATTENTION = True

#: The emulated chip, as ``torch_npu.npu.get_device_name()`` reports it. "Ascend910B3" is an Atlas
#: A2 training chip; set e.g. "Ascend910A" (Atlas training series) to emulate a chip without bfloat16.
SOC_VERSION = "Ascend910B3"

_INT_MAX = 2147483647
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
_SOFTMAX_STAT_LANES = 8
_MASKED = torch.finfo(torch.float32).min  # the kernel "selects" masked logits to a huge negative


# --------------------------------------------------------------- torch_npu's schemas and docs
#: Schemas and doc rules of the ops we call, per torch_npu release, extracted from the PyPI wheels by
#: ``tools/torch_npu_schemas.py``.
SCHEMAS = json.loads((Path(__file__).resolve().parents[1] / "torch_npu_schemas.json").read_text(encoding="utf-8"))
RELEASES = tuple(SCHEMAS["releases"])

#: The emulated torch_npu release: its schemas bind every call, its doc blocks give the chip lists
#: and the graph-mode rule. :func:`use_release` switches it (and removes the ops it lacks).
RELEASE = "2.14.0"

_PRODUCT_SERIES = (("A3", "Atlas A3"), ("A2", "Atlas A2"), ("A2", "Atlas 800I A2"), ("inference", "Atlas 推理系列产品"),
                   ("training", "Atlas 训练系列产品"))
_SERIES_OF_CHIP = (("A3", "Ascend910_93"), ("A2", "Ascend910B"), ("inference", "Ascend310P"), ("training", "Ascend910"))
#: bfloat16 by series, where the doc block names it per product: npu_geglu "BFLOAT16(Atlas A2 训练系列产品
#: 支持)"; npu_group_norm_silu "Atlas A2 ...: 数据类型支持float16、float、bfloat16" (inference series
#: float16/float only); npu_group_norm_swish "BFLOAT16数据类型仅支持如下产品型号：Atlas A2训练系列产品".
_BF16_SERIES = {"npu_fused_infer_attention_score": ("A2", "A3")}


def _release_info(release: str | None = None) -> dict:
    return SCHEMAS["releases"][release or RELEASE]


def doc_block(op: str, release: str | None = None) -> dict | None:
    """The op's doc block (products, rules) in the release, None where the release documents none."""
    key = _release_info(release)["docs"].get(op)
    return None if key is None else SCHEMAS["doc_blocks"][key]


def documented_series(op: str, release: str | None = None) -> set[str] | None:
    """The chip series the op's doc block lists in its products section ("支持的型号"); for
    npu_fused_infer_attention_score, which has none, the products its dtype lines name. None when
    the block names none (npu_geglu: any chip)."""
    block = doc_block(op, release)
    products = (block["named_products"] if op == "npu_fused_infer_attention_score" else block["products"]) if block else []
    series = {s for product in products for s, prefix in _PRODUCT_SERIES if prefix in product}
    return series or None


def _chip_series() -> str | None:
    return next((s for s, prefix in _SERIES_OF_CHIP if SOC_VERSION.startswith(prefix)), None)


def _check_chip(op: str, dtype: torch.dtype) -> None:
    """The op's documented chip list (and bfloat16's) for the emulated release and chip."""
    series, listed = _chip_series(), documented_series(op)
    where = f"torch_npu {RELEASE} _op_plugin_docs.py, {op} block"
    if listed is not None and series not in listed:
        _fail(op, f"not documented for {SOC_VERSION} (lists {sorted(listed)}: {where})")
    if dtype == torch.bfloat16 and series not in _BF16_SERIES.get(op, ("A2",)):
        _fail(op, f"bfloat16 is not documented for {SOC_VERSION} ({where})")


def _check_doc_rule(op: str, rule: str, broken: bool) -> None:
    """Fail when the emulated release's doc block states ``rule`` and the call breaks it."""
    block = doc_block(op)
    if broken and block is not None and any(rule in line for line in block["rules"]):
        _fail(op, f"called against its documented rule \"{rule}\" (torch_npu {RELEASE} _op_plugin_docs.py, {op} block)")


def _check_training_op(op: str, tensors) -> None:
    """npu_fusion_attention and _v3: "该接口仅在训练场景下使用" (training only); npu_fusion_attention
    (2.7.1+): "该接口暂不支持图模式, 不支持aclgraph" (no graph mode), emulated by
    ``torch.compiler.is_compiling()``."""
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    _check_doc_rule(op, "该接口仅在训练场景下使用", not training)
    _check_doc_rule(op, "该接口暂不支持图模式", torch.compiler.is_compiling())


def _parse_default(text: str):
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    if text.startswith('"'):
        return text.strip('"')
    if text.startswith("["):
        return [int(v) for v in text.strip("[]").split(",") if v.strip()]
    return float(text) if any(c in text for c in ".e") else int(text)


@functools.lru_cache(maxsize=None)
def _parsed(schema: str) -> tuple[inspect.Signature, int]:
    args, returns = schema.split("(", 1)[1].rsplit(") -> ", 1)
    params, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    for arg in (a.strip() for a in args.split(",")):
        if arg == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        declared, _, default = arg.partition("=")
        type_name, name = declared.rsplit(" ", 1)
        default = _parse_default(default) if default else inspect.Parameter.empty
        params.append(inspect.Parameter(name, kind, default=default, annotation=type_name))
    count = len(returns.strip("()").split(",")) if returns.startswith("(") else 1
    return inspect.Signature(params), count


def schema_signature(op: str, release: str | None = None) -> tuple[inspect.Signature, int]:
    """``(signature, number of outputs)`` of ``op`` in the release's schema."""
    schemas = _release_info(release)["schemas"]
    if op not in schemas:
        _fail(op, f"not in torch_npu {release or RELEASE}")
    return _parsed(schemas[op])


def _check_type(op: str, name: str, declared: str, value) -> None:
    optional, base = declared.endswith("?"), declared.rstrip("?")
    if value is None:
        if not optional:
            _fail(op, f"{name} ({declared}) is required, got None")
        return
    element = base.split("[")[0]
    checks = {
        "Tensor": lambda v: isinstance(v, torch.Tensor),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "SymInt": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
    }
    ok = checks[element]
    good = (isinstance(value, (list, tuple)) and all(ok(v) for v in value)) if "[" in base else ok(value)
    if not good:
        _fail(op, f"{name} must be {declared} (torch_npu {RELEASE} schema), got {type(value).__name__}")


@contextlib.contextmanager
def use_release(release: str):
    """Emulate torch_npu ``release``: its schemas and doc rules; the ops it lacks are removed."""
    global RELEASE
    module = sys.modules[__name__]
    previous, RELEASE = RELEASE, release
    missing = [op for op in SCHEMAS["functions"] if op not in _release_info(release)["schemas"] and hasattr(module, op)]
    removed = {op: getattr(module, op) for op in missing}
    for op in missing:
        delattr(module, op)
    try:
        yield
    finally:
        RELEASE = previous
        for op, fn in removed.items():
            setattr(module, op, fn)


# ------------------------------------------------------------------------------------ recording
def reset() -> None:
    """Forget every recorded call."""
    CALLS.clear()


def calls(name: str) -> list[dict[str, Any]]:
    """The recorded calls of one op."""
    return [c for c in CALLS if c["name"] == name]


def _recorded(fn):
    """Bind each call of ``fn`` against the emulated release's schema (:data:`RELEASE`, from
    ``torch_npu_schemas.json``: names, keyword-only, required arguments, argument types, number of
    outputs), record it, and run ``fn`` with the arguments it implements; any other argument must
    keep its schema default (else the call is not emulated)."""
    name, implemented = fn.__name__, inspect.signature(fn).parameters

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        signature, returns = schema_signature(name)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            _fail(name, f"does not bind to the torch_npu {RELEASE} schema: {exc}")
        bound.apply_defaults()
        for param, value in bound.arguments.items():
            _check_type(name, param, signature.parameters[param].annotation, value)
        stored = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in bound.arguments.items()}
        CALLS.append(
            {
                "name": name,
                "kwargs": stored,
                "shapes": {k: tuple(v.shape) for k, v in stored.items() if isinstance(v, torch.Tensor)},
                "dtypes": {k: v.dtype for k, v in stored.items() if isinstance(v, torch.Tensor)},
            }
        )
        for param, value in bound.arguments.items():
            if param not in implemented and value != signature.parameters[param].default:
                raise NotImplementedError(f"[torch_npu stand-in] {name}: argument {param}={value!r} is not emulated")
        result = fn(**{k: v for k, v in bound.arguments.items() if k in implemented})
        if isinstance(result, tuple) and len(result) < returns and "sink" in signature.parameters:
            result = result + (torch.empty(0),) * (returns - len(result))  # dsink: no sink is ever passed
        if (len(result) if isinstance(result, tuple) else 1) != returns:
            _fail(name, f"the stand-in returned {len(result)} outputs, the {RELEASE} schema {returns}")
        return result

    return wrapper


def _fail(op: str, message: str):
    raise RuntimeError(f"[torch_npu stand-in] {op}: {message}")


def _check_dtype(op: str, name: str, t: torch.Tensor, allowed=_FUSED_DTYPES) -> None:
    if t.dtype not in allowed:
        _fail(op, f"{name} dtype {t.dtype} is not supported (supported: {', '.join(map(str, allowed))})")


def _working(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and back to float32: an intermediate the device keeps in the
    input's dtype (attention's probabilities before P·V, GroupNorm's returned statistics)."""
    return t.to(dtype).float()


# -------------------------------------------------------------------------- npu_fusion_attention
def _to_bnsd(t: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout == "BSH":
        return t.unflatten(2, (heads, -1)).transpose(1, 2)
    if layout == "SBH":
        return t.unflatten(2, (heads, -1)).permute(1, 2, 0, 3)
    raise NotImplementedError(f"[torch_npu stand-in] layout {layout} is not emulated")


def _from_bnsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout == "BSH":
        return t.transpose(1, 2).flatten(2)
    if layout == "SBH":
        return t.permute(2, 0, 1, 3).flatten(2)
    raise NotImplementedError(f"[torch_npu stand-in] layout {layout} is not emulated")


def _heads_of(t: torch.Tensor, layout: str, head_dim: int, head_num: int) -> int:
    if layout == "BNSD":
        return t.shape[1]
    if layout == "BSND":
        return t.shape[2]
    return t.shape[-1] // head_dim if head_dim else head_num


def _attention_inputs(op, query, key, value, head_num, input_layout, pse, atten_mask, keep_prob, sparse_mode,
                      pre_tockens, next_tockens, prefix, actual_seq_qlen, actual_seq_kvlen, padding_mask):
    """Check the documented constraints; return q, k, v as [B, N, S, D] views and (B, N, Sq, Skv)."""
    if input_layout not in _LAYOUTS:
        _fail(op, f"input_layout {input_layout!r} is not one of {_LAYOUTS}")
    if input_layout == "TND" or actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise NotImplementedError("[torch_npu stand-in] the TND/varlen form is not emulated")
    if padding_mask is not None:
        _fail(op, "padding_mask is not supported (documented as not yet supported)")
    if not 0.0 < keep_prob <= 1.0:
        _fail(op, f"keep_prob must be in (0, 1], got {keep_prob}")
    if keep_prob != 1.0:
        raise NotImplementedError("[torch_npu stand-in] dropout (keep_prob < 1) is not emulated")
    if sparse_mode != 0 or prefix is not None or pre_tockens != _INT_MAX or next_tockens != _INT_MAX:
        raise NotImplementedError("[torch_npu stand-in] only sparse_mode=0 with default tockens is emulated")
    _check_chip(op.replace("_grad", ""), query.dtype)
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_dtype(op, name, t)
        if t.dtype == torch.float32 and not SUPPORTS_FP32_ATTENTION:
            _fail(op, f"{name} dtype torch.float32 is not supported by this (emulated) release")
        expected_dim = 4 if input_layout in ("BNSD", "BSND") else 3
        if t.dim() != expected_dim:
            _fail(op, f"{name} must be {expected_dim}-D for layout {input_layout}, got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        _fail(op, "query, key and value must have the same dtype")
    if key.shape != value.shape:
        _fail(op, f"key and value shapes must match, got {tuple(key.shape)} and {tuple(value.shape)}")
    head_dim = query.shape[-1] if input_layout in ("BNSD", "BSND") else query.shape[-1] // head_num
    if input_layout in ("BSH", "SBH") and query.shape[-1] % head_num:
        _fail(op, f"H={query.shape[-1]} is not a multiple of head_num={head_num}")
    heads_q = _heads_of(query, input_layout, head_dim, head_num)
    if heads_q != head_num:
        _fail(op, f"head_num={head_num} but query has {heads_q} heads in layout {input_layout}")
    heads_kv = _heads_of(key, input_layout, head_dim, head_num)
    q = _to_bnsd(query, input_layout, heads_q)
    k = _to_bnsd(key, input_layout, heads_kv)
    v = _to_bnsd(value, input_layout, heads_kv)
    batch, _, seq_q, d_q = q.shape
    seq_kv, d_k, d_v = k.shape[2], k.shape[3], v.shape[3]
    if k.shape[0] != batch:
        _fail(op, "batch sizes of query and key/value differ")
    if d_q != d_k or d_k < d_v or not 1 <= d_q <= 768:
        _fail(op, f"head dims must satisfy Dq == Dk >= Dv and 1 <= D <= 768, got {d_q}, {d_k}, {d_v}")
    if not 1 <= head_num <= 256 or heads_kv == 0 or head_num % heads_kv:
        _fail(op, f"Nq={head_num} must be in 1..256 and a multiple of Nkv={heads_kv}")
    full = (batch, head_num, seq_q, seq_kv)
    if atten_mask is not None:
        _check_dtype(op, "atten_mask", atten_mask, (torch.bool, torch.uint8))
        allowed = {full, (batch, 1, seq_q, seq_kv), (1, 1, seq_q, seq_kv), (seq_q, seq_kv)}
        if tuple(atten_mask.shape) not in allowed:
            _fail(op, f"atten_mask shape {tuple(atten_mask.shape)} is not BNSS/B1SS/11SS/SS for {full}")
    if pse is not None:
        if pse.dtype != query.dtype:
            _fail(op, f"pse dtype {pse.dtype} must equal the query dtype {query.dtype}")
        allowed = {full, (batch, head_num, 1, seq_kv), (1, head_num, seq_q, seq_kv)}
        if tuple(pse.shape) not in allowed:
            _fail(op, f"pse shape {tuple(pse.shape)} is not BNSS/BN1Skv/1NSS for {full}")
    return q, k, v, full


def _scores(q, k, pse, atten_mask, scale):
    """Masked logits ``scale * (pse + q kᵀ)`` in float32, k already repeated to the query heads."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2))
    if pse is not None:
        s = s + pse.float()
    s = s * scale
    if atten_mask is not None:
        s = s.masked_fill(atten_mask.bool(), _MASKED)
    return s


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


class _FusionAttention(torch.autograd.Function):
    """Forward in reference maths; backward = the stand-in ``npu_fusion_attention_grad``, fed the
    forward's results exactly as torch_npu's derivatives.yaml entry does."""

    @staticmethod
    def forward(ctx, query, key, value, pse, atten_mask, attrs):
        q, k, v, _ = attrs["bnsd"](query, key, value)
        heads = q.shape[1]
        s = _scores(q, _repeat_kv(k, heads), pse, atten_mask, attrs["scale"])
        smax = s.amax(dim=-1, keepdim=True)
        e = torch.exp(s - smax)
        ssum = e.sum(dim=-1, keepdim=True)
        out = torch.matmul(_working(e / ssum, query.dtype), _repeat_kv(v, heads).float()).to(query.dtype)
        out = _from_bnsd(out, attrs["input_layout"]).contiguous()
        lanes = smax.shape[:-1] + (_SOFTMAX_STAT_LANES,)
        softmax_max, softmax_sum = smax.expand(lanes).contiguous(), ssum.expand(lanes).contiguous()
        softmax_out = query.new_empty(0)  # "reserved, not used"
        ctx.attrs = attrs
        ctx.has_pse = pse is not None
        ctx.save_for_backward(query, key, value, pse, atten_mask, softmax_max, softmax_sum, softmax_out, out)
        ctx.mark_non_differentiable(softmax_max, softmax_sum, softmax_out)
        return out, softmax_max, softmax_sum, softmax_out

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        query, key, value, pse, atten_mask, softmax_max, softmax_sum, softmax_out, out = ctx.saved_tensors
        a = ctx.attrs
        dq, dk, dv, dpse = npu_fusion_attention_grad(
            query, key, value, grad_out, a["head_num"], a["input_layout"],
            pse=pse, padding_mask=None, atten_mask=atten_mask,
            softmax_max=softmax_max, softmax_sum=softmax_sum, softmax_in=softmax_out, attention_in=out,
            scale_value=a["scale"], keep_prob=a["keep_prob"], pre_tockens=a["pre_tockens"],
            next_tockens=a["next_tockens"], inner_precise=a["inner_precise"], seed=0, offset=0, numels=0,
            prefix=a["prefix"], actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=a["sparse_mode"],
            gen_mask_parallel=a["gen_mask_parallel"], sync=a["sync"],
        )[:4]  # 2.7.1+ schemas add dsink
        return dq, dk, dv, (dpse if ctx.has_pse else None), None, None


@_recorded
def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
                         inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False):
    """``-> (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``."""
    _check_training_op("npu_fusion_attention", (query, key, value, pse))
    checked = dict(head_num=head_num, input_layout=input_layout, pse=pse, atten_mask=atten_mask,
                   keep_prob=keep_prob, sparse_mode=sparse_mode, pre_tockens=pre_tockens, next_tockens=next_tockens,
                   prefix=prefix, actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                   padding_mask=padding_mask)
    _attention_inputs("npu_fusion_attention", query, key, value, **checked)
    attrs = dict(
        head_num=head_num, input_layout=input_layout, scale=float(scale), keep_prob=keep_prob,
        pre_tockens=pre_tockens, next_tockens=next_tockens, inner_precise=inner_precise, prefix=prefix,
        sparse_mode=sparse_mode, gen_mask_parallel=gen_mask_parallel, sync=sync,
        bnsd=lambda q, k, v: _attention_inputs("npu_fusion_attention", q, k, v, **checked),
    )
    out, softmax_max, softmax_sum, softmax_out = _FusionAttention.apply(query, key, value, pse, atten_mask, attrs)
    return out, softmax_max, softmax_sum, softmax_out, 0, 0, 0


@_recorded
def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                              atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None,
                              attention_in=None, scale_value=1.0, keep_prob=1.0, pre_tockens=2147483647,
                              next_tockens=2147483647, inner_precise=0, seed=0, offset=0, numels=0, prefix=None,
                              actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True,
                              sync=False):
    """``-> (dq, dk, dv, dpse)``: FlashAttention's backward from the saved softmax statistics."""
    op = "npu_fusion_attention_grad"
    if softmax_max is None or softmax_sum is None or attention_in is None:
        _fail(op, "softmax_max, softmax_sum and attention_in (the forward's results) are required")
    q, k, v, full = _attention_inputs(op, query, key, value, head_num, input_layout, pse, atten_mask, keep_prob,
                                      sparse_mode, pre_tockens, next_tockens, prefix, actual_seq_qlen,
                                      actual_seq_kvlen, padding_mask)
    heads = q.shape[1]
    group = heads // k.shape[1]
    kr, vr = _repeat_kv(k, heads).float(), _repeat_kv(v, heads).float()
    s = _scores(q, kr, pse, atten_mask, scale_value)
    p = torch.exp(s - softmax_max[..., :1]) / softmax_sum[..., :1]  # the saved statistics, not recomputed
    g = _to_bnsd(dy, input_layout, heads).float()
    o = _to_bnsd(attention_in, input_layout, heads).float()
    dv = torch.matmul(p.transpose(-1, -2), g)
    dp = torch.matmul(g, vr.transpose(-1, -2))
    ds = p * (dp - (g * o).sum(dim=-1, keepdim=True))  # gradient of the scaled, masked logits
    dq = torch.matmul(ds, kr) * scale_value
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale_value
    if group > 1:
        dk = dk.unflatten(1, (-1, group)).sum(2)
        dv = dv.unflatten(1, (-1, group)).sum(2)
    dpse = query.new_empty(0)
    if pse is not None:
        dpse = ds * scale_value  # d(scale * (pse + qkᵀ)) / d pse
        reduce = tuple(i for i in range(4) if pse.shape[i] == 1 and full[i] != 1)
        dpse = (dpse.sum(dim=reduce, keepdim=True) if reduce else dpse).to(pse.dtype)
    back = [_from_bnsd(t, input_layout).to(ref.dtype).contiguous() for t, ref in ((dq, query), (dk, key), (dv, value))]
    return back[0], back[1], back[2], dpse


@_recorded
def npu_fusion_attention_v3(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                            scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
                            inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                            gen_mask_parallel=True, sync=False):
    """``-> (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset)``, seed/offset as
    tensors. Computed without autograd: whether torch_npu registers one for _v3 is not documented,
    so the adapter calls ``npu_fusion_attention_grad_v3`` itself."""
    # Its "仅在训练场景下使用" is not checked here: the adapter calls it inside its own autograd
    # Function, whose forward runs without grad mode, as the real op would see it too.
    checked = dict(head_num=head_num, input_layout=input_layout, pse=pse, atten_mask=atten_mask,
                   keep_prob=keep_prob, sparse_mode=sparse_mode, pre_tockens=pre_tockens, next_tockens=next_tockens,
                   prefix=prefix, actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                   padding_mask=padding_mask)
    _attention_inputs("npu_fusion_attention_v3", query, key, value, **checked)
    attrs = dict(scale=float(scale), input_layout=input_layout,
                 bnsd=lambda q, k, v: _attention_inputs("npu_fusion_attention_v3", q, k, v, **checked))
    with torch.no_grad():
        out, softmax_max, softmax_sum, softmax_out = _FusionAttention.forward(
            types.SimpleNamespace(save_for_backward=lambda *a: None, mark_non_differentiable=lambda *a: None),
            query, key, value, pse, atten_mask, attrs)
    zero = torch.zeros((), dtype=torch.int64)
    return out, softmax_max, softmax_sum, softmax_out, zero, zero.clone()


@_recorded
def npu_fusion_attention_grad_v3(query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                                 atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None,
                                 attention_in=None, scale_value=1.0, keep_prob=1.0, pre_tockens=2147483647,
                                 next_tockens=2147483647, inner_precise=0, seed=None, offset=None, prefix=None,
                                 actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True,
                                 sync=False):
    """``-> (dq, dk, dv, dpse[, dsink])``: the same maths as ``npu_fusion_attention_grad``."""
    return npu_fusion_attention_grad.__wrapped__(
        query, key, value, dy, head_num, input_layout, pse=pse, atten_mask=atten_mask, softmax_max=softmax_max,
        softmax_sum=softmax_sum, softmax_in=softmax_in, attention_in=attention_in, scale_value=scale_value,
        keep_prob=keep_prob, pre_tockens=pre_tockens, next_tockens=next_tockens, inner_precise=inner_precise,
        sparse_mode=sparse_mode,
    )


@_recorded
def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, num_heads=1, scale=1.0,
                                    pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                                    num_key_value_heads=0, sparse_mode=0, inner_precise=0):
    """``-> (attention_out, softmax_lse)`` (softmax_lse empty without ``softmax_lse_flag``). Checks
    its documented limits: float16/bfloat16, D <= 512, N <= 256, atten_mask B1SS/11SS/1SS/SS;
    "支持推理场景", so no autograd here."""
    op = "npu_fused_infer_attention_score"
    if pse_shift is not None or sparse_mode != 0 or input_layout not in ("BNSD", "BSND"):
        raise NotImplementedError(f"[torch_npu stand-in] {op}: only sparse_mode=0, no pse_shift, BNSD/BSND")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_dtype(op, name, t, (torch.float16, torch.bfloat16))
        if not t.is_contiguous():
            _fail(op, f"{name} must be contiguous (\"不支持非连续的Tensor\")")
    _check_chip(op, query.dtype)
    q, k, v = (_to_bnsd(t, input_layout, num_heads) for t in (query, key, value))
    batch, heads, seq_q, dim = q.shape
    if heads != num_heads or not 1 <= heads <= 256 or not 1 <= dim <= 512 or k.shape != v.shape:
        _fail(op, f"num_heads={num_heads}, shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} outside its limits")
    if atten_mask is not None:
        _check_dtype(op, "atten_mask", atten_mask, (torch.bool, torch.int8, torch.uint8))
        seq_kv = k.shape[2]
        allowed = {(batch, 1, seq_q, seq_kv), (1, 1, seq_q, seq_kv), (1, seq_q, seq_kv), (seq_q, seq_kv)}
        if tuple(atten_mask.shape) not in allowed:
            _fail(op, f"atten_mask shape {tuple(atten_mask.shape)} is not B1SS/11SS/1SS/SS")
    with torch.no_grad():
        s = _scores(q, k, None, atten_mask, float(scale))
        p = torch.softmax(s, dim=-1)
        out = torch.matmul(_working(p, query.dtype), v.float()).to(query.dtype)
    return _from_bnsd(out, input_layout).contiguous(), query.new_empty(0, dtype=torch.float32)


# ------------------------------------------------------------------------------------- npu_geglu
def _gelu_halves(x: torch.Tensor, dim: int, activate_left: bool):
    left, right = x.float().chunk(2, dim=dim)
    return (left, right) if activate_left else (right, left)  # (activated half, linear half)


class _Geglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, approximate, activate_left):
        gated, linear = _gelu_halves(x, dim, activate_left)
        gelu = F.gelu(gated, approximate="tanh" if approximate == 1 else "none")
        out_gelu = gelu.to(x.dtype)
        out = linear.to(x.dtype) * out_gelu  # the product of the two halves in the input's dtype
        ctx.save_for_backward(x, out_gelu)
        ctx.args = (dim, approximate, activate_left)
        ctx.mark_non_differentiable(out_gelu)  # output_differentiability: [true, false]
        return out, out_gelu

    @staticmethod
    def backward(ctx, grad, _grad_gelu):
        x, out_gelu = ctx.saved_tensors
        return npu_geglu_grad(grad, x, out_gelu, *ctx.args), None, None, None


@_recorded
def npu_geglu(self, dim=-1, approximate=1, activate_left=False):
    """``-> (out, out_gelu)``; ``out = A * gelu(B)`` (A first half, B second half along ``dim``)."""
    _check_dtype("npu_geglu", "self", self)
    _check_chip("npu_geglu", self.dtype)
    ndim = max(self.dim(), 1)
    if not -ndim <= dim < ndim:
        _fail("npu_geglu", f"dim {dim} out of range for a {self.dim()}-D tensor")
    if approximate not in (0, 1):
        _fail("npu_geglu", f"approximate must be 0 (none) or 1 (tanh), got {approximate!r}")
    if self.shape[dim] % 2:
        _fail("npu_geglu", f"size {self.shape[dim]} of dim {dim} must be even")
    return _Geglu.apply(self, dim, approximate, activate_left)


@_recorded
def npu_geglu_grad(grad_output, self, gelu, dim=-1, approximate=1, activate_left=False):
    """Gradient of ``npu_geglu``'s ``out`` w.r.t. ``self``, from the saved ``gelu`` output."""
    gated, linear = _gelu_halves(self, dim, activate_left)
    g = grad_output.float()
    grad_linear = g * gelu.float()
    grad_gated = torch.ops.aten.gelu_backward(g * linear, gated, approximate="tanh" if approximate == 1 else "none")
    halves = (grad_gated, grad_linear) if activate_left else (grad_linear, grad_gated)
    return torch.cat(halves, dim=dim).to(self.dtype)


# --------------------------------------------------------------------------- npu_group_norm_silu
@_recorded
def npu_group_norm_silu(input, weight, bias, group, eps=0.00001):  # noqa: A002 (documented name)
    """``-> (out, mean, rstd)``; mean/rstd ``(N, group)`` in ``input``'s dtype. No backward exists:
    the outputs are computed without autograd, as with the real op."""
    op = "npu_group_norm_silu"
    _check_dtype(op, "input", input)
    _check_chip(op, input.dtype)
    if input.dim() < 2 or any(size <= 0 for size in input.shape):  # "维度需大于一维"
        _fail(op, f"input must have more than one dimension, each > 0, got shape {tuple(input.shape)}")
    if group <= 0 or input.shape[1] % group:
        _fail(op, f"group={group} must be > 0 and divide the {input.shape[1]} channels")
    if eps <= 0:
        _fail(op, f"eps must be > 0, got {eps}")
    if weight is None or bias is None:
        _fail(op, "weight and bias are required (the docs: \"必选输入\"; the schemas say Tensor?)")
    for name, t in (("weight", weight), ("bias", bias)):
        _check_dtype(op, name, t)
        if t.dim() != 1 or t.shape[0] != input.shape[1]:
            _fail(op, f"{name} must be 1-D with {input.shape[1]} elements, got shape {tuple(t.shape)}")
    if weight.dtype != bias.dtype:
        _fail(op, f"weight and bias dtypes differ: {weight.dtype}, {bias.dtype}")
    if weight.dtype != input.dtype and weight.dtype != torch.float32:
        _fail(op, f"weight/bias dtype {weight.dtype} is less precise than the input dtype {input.dtype}")
    with torch.no_grad():
        grouped = input.float().reshape(input.shape[0], group, -1)
        var, mean = torch.var_mean(grouped, dim=-1, unbiased=False)
        # The statistics are returned in the input's dtype; the stand-in normalises with those.
        mean, rstd = _working(mean, input.dtype), _working(torch.rsqrt(var + eps), input.dtype)
        y = ((grouped - mean[..., None]) * rstd[..., None]).reshape(input.shape)
        affine_shape = (1, -1) + (1,) * (input.dim() - 2)
        y = y * weight.float().reshape(affine_shape) + bias.float().reshape(affine_shape)
        return F.silu(y).to(input.dtype), mean.to(input.dtype), rstd.to(input.dtype)


# ------------------------------------------------------------------------- npu_group_norm_swish
def _group_norm_swish_inputs(op, input, num_groups, weight, bias):  # noqa: A002
    _check_chip("npu_group_norm_swish", input.dtype)
    _check_dtype(op, "input", input)
    if not 2 <= input.dim() <= 8 or input.shape[0] <= 0 or input.shape[1] <= 0:
        _fail(op, f"input must be 2..8-D with N, C > 0, got shape {tuple(input.shape)}")
    if num_groups <= 0 or input.shape[1] % num_groups:
        _fail(op, f"num_groups={num_groups} must be > 0 and divide the {input.shape[1]} channels")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            _fail(op, f"{name} is required")
        if t.dtype != input.dtype:
            _fail(op, f"{name} dtype {t.dtype} must equal the input dtype {input.dtype}")
        if t.dim() != 1 or t.shape[0] != input.shape[1]:
            _fail(op, f"{name} must be 1-D with {input.shape[1]} elements, got shape {tuple(t.shape)}")


def _normalized(input, num_groups, mean, rstd):  # noqa: A002
    grouped = input.float().reshape(input.shape[0], num_groups, -1)
    return ((grouped - mean.float()[..., None]) * rstd.float()[..., None]).reshape(input.shape)


class _GroupNormSwish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, num_groups, weight, bias, eps, swish_scale):  # noqa: A002
        grouped = input.float().reshape(input.shape[0], num_groups, -1)
        var, mean = torch.var_mean(grouped, dim=-1, unbiased=False)
        mean, rstd = mean.to(input.dtype), torch.rsqrt(var + eps).to(input.dtype)
        affine_shape = (1, -1) + (1,) * (input.dim() - 2)
        y = _normalized(input, num_groups, mean, rstd) * weight.float().reshape(affine_shape) + bias.float().reshape(affine_shape)
        out = (y * torch.sigmoid(swish_scale * y)).to(input.dtype)
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.args = (num_groups, swish_scale)
        ctx.mark_non_differentiable(mean, rstd)
        return out, mean, rstd

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_rstd):
        input, weight, bias, mean, rstd = ctx.saved_tensors  # noqa: A001
        num_groups, swish_scale = ctx.args
        mask = list(ctx.needs_input_grad[i] for i in (0, 2, 3))
        dx, dw, db = npu_group_norm_swish_grad(grad, input, num_groups, weight, bias, mean, rstd, mask, swish_scale)
        return dx, None, dw, db, None, None


@_recorded
def npu_group_norm_swish(input, num_groups, weight, bias, eps=1e-5, swish_scale=1.0):  # noqa: A002
    """``-> (out, mean, rstd)``: ``y = group_norm(input)``, ``out = y * sigmoid(swish_scale * y)``."""
    _group_norm_swish_inputs("npu_group_norm_swish", input, num_groups, weight, bias)
    return _GroupNormSwish.apply(input, num_groups, weight, bias, eps, swish_scale)


@_recorded
def npu_group_norm_swish_grad(grad, input, num_groups, weight, bias, mean, rstd, grad_input_mask, swish_scale=1.0):  # noqa: A002
    """``-> (grad_input, grad_weight, grad_bias)`` from the forward's mean/rstd, in float32 maths."""
    op = "npu_group_norm_swish_grad"
    _group_norm_swish_inputs(op, input, num_groups, weight, bias)
    for name, t in (("grad", grad), ("mean", mean), ("rstd", rstd)):
        if t.dtype != input.dtype:
            _fail(op, f"{name} dtype {t.dtype} must equal the input dtype {input.dtype}")
    affine_shape = (1, -1) + (1,) * (input.dim() - 2)
    xhat = _normalized(input, num_groups, mean, rstd)
    w = weight.float().reshape(affine_shape)
    y = xhat * w + bias.float().reshape(affine_shape)
    sig = torch.sigmoid(swish_scale * y)
    dy = grad.float() * (sig + swish_scale * y * sig * (1 - sig))
    reduce = [0] + list(range(2, input.dim()))
    db = dy.sum(dim=reduce)
    dw = (dy * xhat).sum(dim=reduce)
    g = (dy * w).reshape(input.shape[0], num_groups, -1)
    xg = xhat.reshape(input.shape[0], num_groups, -1)
    dx = (g - g.mean(dim=-1, keepdim=True) - xg * (g * xg).mean(dim=-1, keepdim=True)) * rstd.float()[..., None]
    outs = (dx.reshape(input.shape).to(input.dtype), dw.to(weight.dtype), db.to(bias.dtype))
    return tuple(t if needed else None for t, needed in zip(outs, grad_input_mask))


# ------------------------------------------------------------------ the device's ATen operators
class _DeviceRules(TorchDispatchMode):
    """Applies the documented aclnn rules to the ATen operators an NPU would run as aclnn calls."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.native_group_norm_backward.default:
            _group_norm_backward_rule(*args, **kwargs)
        return func(*args, **kwargs)


def _group_norm_backward_rule(grad_out, input, mean, rstd, weight, *_sizes_and_mask):  # noqa: A002
    op = "aclnnGroupNormBackward"
    if input.dtype == torch.float64:
        return  # the tests' float64 reference maths, which never runs on a device
    CALLS.append({"name": op, "kwargs": {}, "shapes": {}, "dtypes": {
        "gradOut": grad_out.dtype, "input": input.dtype, "mean": mean.dtype, "rstd": rstd.dtype}})
    for name, t in (("gradOut", grad_out), ("input", input), ("mean", mean), ("rstd", rstd)):
        _check_dtype(op, name, t, (torch.float16, torch.bfloat16, torch.float32))
        _check_chip(op, t.dtype)
        if t.dtype != grad_out.dtype:
            _fail(op, f"{name} dtype {t.dtype} must equal gradOut's dtype {grad_out.dtype} (CANN 8.0 aclnnGroupNormBackward)")


def emulated_device():
    """Context manager: inside it, the ATen operators that an NPU runs as aclnn operators obey the
    rules documented for those (today: aclnnGroupNormBackward's dtypes), raising as the device would."""
    return _DeviceRules()


# -------------------------------------------------------------------------- torch_npu.npu (tiny)
npu = types.SimpleNamespace(
    config=types.SimpleNamespace(allow_internal_format=True),
    synchronize=lambda device=None: None,
    is_available=lambda: False,
    get_device_name=lambda device=None: SOC_VERSION,
)
