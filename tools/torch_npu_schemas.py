"""Extract, from torch_npu's PyPI wheels, the schemas and documented rules of the operators that
``npu_kernels.backends.npu`` calls, into ``tests/torch_npu_standin/torch_npu_schemas.json``.

The test stand-in (``tests/torch_npu_standin/torch_npu``) takes its signatures and per-op chip lists
from that file, and ``tests/backends/test_npu_schemas.py`` binds every adapter call against every
release's schema. Run it again when a torch_npu release is added (it needs PyPI, ~45 MB a wheel)::

    python tools/torch_npu_schemas.py                # all RELEASES, wheels cached in /tmp/torch_npu_wheels
    python tools/torch_npu_schemas.py --wheels DIR   # another cache folder

What is read from each wheel (nothing is executed; only these members are read):

* ``torch_npu/csrc/aten/*native_functions*.yaml``: the ``func:`` schema of each function below;
* ``torch_npu/_op_plugin_docs.py``: the ``_add_torch_npu_docstr(name, doc)`` block of each function:
  its "支持的型号" (supported products) lines, its "约束说明" (constraints) lines that state a rule we
  follow (training only, graph mode), the dtype lines that name a product, and its formula lines;
* the file list: which compile back ends the wheel ships.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

#: One wheel per minor release, the newest build of each (``pip index versions torch_npu``).
RELEASES = (
    "2.5.1.post1", "2.6.0.post5", "2.7.1.post11", "2.8.0.post5", "2.9.1",
    "2.10.0.post7", "2.11.0.post3", "2.12.0.post3", "2.13.0", "2.14.0",
)

#: The torch_npu functions the adapters call (and the backward ops torch_npu's autograd runs).
FUNCTIONS = (
    "npu_fusion_attention", "npu_fusion_attention_grad",
    "npu_fusion_attention_v2",
    "npu_fusion_attention_v3", "npu_fusion_attention_grad_v3",
    "npu_fused_infer_attention_score",
    "npu_geglu", "npu_geglu_grad",
    "npu_group_norm_silu",
    "npu_group_norm_swish", "npu_group_norm_swish_grad",
)

#: Compile back ends, by a file that only a wheel shipping them has.
COMPILE_BACKENDS = {
    "torch_npu._inductor": "torch_npu/_inductor/__init__.py",
    "npugraph_ex": "torch_npu/dynamo/npugraph_ex/__init__.py",
    "torchair": "torch_npu/dynamo/torchair/__init__.py",
}

#: Constraint lines kept from a doc block: the rules the adapters act on.
RULE_WORDS = ("训练场景", "推理场景", "图模式", "aclgraph", "bfloat16", "BFLOAT16", "Head Dim", "Head-Dim",
              "无效行", "pse_type", "计算公式", "Softmax(", "softmax(")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "torch_npu_standin" / "torch_npu_schemas.json"
_DOCSTR = re.compile(r'_add_torch_npu_docstr\(\s*"([^"]+)",\s*"""(.*?)"""', re.S)
_PRODUCT = re.compile(r"(Atlas ?(?:A2|A3)? ?(?:训练|推理)系列产品|Atlas 800I A2 ?推理产品|Ascend ?9\d\d\w*)")
_FUNC = re.compile(r"^\s*-?\s*func:\s*([A-Za-z0-9_]+)\((.*)$")


def download(release: str, folder: Path) -> Path:
    """The wheel of ``release`` in ``folder`` (``pip download`` it when absent)."""
    found = sorted(folder.glob(f"torch_npu-{release}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64", "--platform",
             "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "-d", str(folder),
             f"torch_npu=={release}"],
            check=True,
        )
        found = sorted(folder.glob(f"torch_npu-{release}-*.whl"))
    return found[0]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def schemas(yaml_texts: list[str]) -> dict[str, str]:
    """``name -> "name(args) -> returns"``, the first plain (not ``.out``) entry of each function."""
    found: dict[str, str] = {}
    for text in yaml_texts:
        for line in text.splitlines():
            match = _FUNC.match(line)
            if match and match.group(1) in FUNCTIONS and match.group(1) not in found:
                found[match.group(1)] = f"{match.group(1)}({match.group(2).strip()}"
    return found


def _section(doc: str, title: str) -> list[str]:
    """The non-empty lines after a heading line starting with ``title``, up to the next blank line."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip().rstrip(":：").strip() == title:
            out = []
            for follow in lines[i + 1:]:
                if not follow.strip():
                    break
                out.append(follow.strip())
            return out
    return []


def doc_rules(doc: str) -> dict:
    """What a doc block says that the adapters act on."""
    body = doc.split("调用示例")[0].split("示例\n")[0]  # the examples restate nothing we use
    rules = [line.strip() for line in body.splitlines() if any(word in line for word in RULE_WORDS)]
    return {
        "products": _section(doc, "支持的型号"),
        "named_products": sorted(set(_PRODUCT.findall(body))),
        "rules": list(dict.fromkeys(line[:400] for line in rules)),
    }


def read_wheel(path: Path) -> dict:
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        yamls = [wheel.read(n).decode() for n in names
                 if n.startswith("torch_npu/csrc/aten/") and "native_functions" in n and n.endswith(".yaml")]
        docs = wheel.read("torch_npu/_op_plugin_docs.py").decode()
    blocks = dict(_DOCSTR.findall(docs))
    return {
        "wheel": path.name,
        "sha256": sha256(path),
        "docs_sha256": hashlib.sha256(docs.encode()).hexdigest(),
        "compile_backends": [name for name, member in COMPILE_BACKENDS.items() if member in names],
        "schemas": schemas(yamls),
        "docs": {name: doc_rules(blocks[name]) for name in FUNCTIONS if name in blocks},
    }


def deduplicated(releases: dict[str, dict]) -> dict:
    """The releases with each distinct doc block stored once (``docs`` -> ``doc_blocks`` keys)."""
    blocks: dict[str, dict] = {}
    for info in releases.values():
        for name, rules in info["docs"].items():
            key = hashlib.sha256(json.dumps(rules, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]
            blocks[key] = rules
            info["docs"][name] = key
    return blocks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=Path("/tmp/torch_npu_wheels"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.wheels.mkdir(parents=True, exist_ok=True)
    releases = {}
    for release in RELEASES:
        releases[release] = read_wheel(download(release, args.wheels))
        print(release, releases[release]["sha256"][:12], sorted(releases[release]["schemas"]))
    data = {
        "generated_by": "tools/torch_npu_schemas.py",
        "functions": list(FUNCTIONS),
        "doc_blocks": deduplicated(releases),
        "releases": releases,
    }
    args.out.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
