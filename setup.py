"""Distribution ``npu-kernels``: fused diffusers kernels (``npu_kernels``) and an SDXL LoRA trainer (``trainer``)."""
from setuptools import find_packages, setup

setup(
    name="npu-kernels",
    version="0.1.0",
    description="Fused GroupNorm+SiLU, GEGLU and attention kernels for diffusers on Ascend NPU, CUDA and CPU, "
    "with an SDXL LoRA trainer.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["npu_kernels", "npu_kernels.*", "trainer", "trainer.*"]),
    package_data={"trainer": ["scripts/*.sh", "scripts/*.yaml"]},
    # torch is a range on purpose: keep the one you have (CPU, CUDA or the torch that torch_npu pins).
    install_requires=[
        "torch>=2.5",
        "diffusers>=0.30",
        "transformers>=4.40",
        "peft>=0.12",
        "accelerate>=0.30",
        "datasets>=2.19",
        "safetensors>=0.4",
        "pillow",
        "numpy",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "npu": ["torch_npu"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.0"],
    },
)
