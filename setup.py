"""megagpt: a Megatron-style 3D-parallel GPT training toolkit.

`kernels/` at the top of the repository installs as `megagpt.kernels`: a top-level package named
`kernels` would collide with an unrelated PyPI package of that name.
"""
import sys

from setuptools import find_packages, setup

install_requires = [
    "torch>=2.7",            # torch.autograd.backward from a GradientEdge (pipeline.py)
    "numpy",
    "tokenizers>=0.15.1",
    "tiktoken>=0.13",   # linear in a piece's length from 0.13 (quadratic before)
    "tqdm",
    "tensorboard",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.0")

setup(
    name="megagpt",
    version="0.1.0",
    description="Megatron-style tensor, pipeline and data parallel GPT training with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megagpt", "megagpt.*"]) + ["megagpt.kernels"],
    package_dir={"megagpt.kernels": "kernels"},
    package_data={"megagpt.data": ["assets/*.gz", "assets/*.jsonl", "assets/*.md", "assets/gpt2/*"]},
    install_requires=install_requires,
    extras_require={
        # deepspeed builds from its sdist without importing torch (no ops precompiled) and
        # needs only an unpinned torch, so it keeps the CPU torch the Makefile installs first
        "test": ["pytest>=7", "pytest-timeout", "transformers>=4.40", "safetensors",
                 "deepspeed==0.19.8; sys_platform == 'linux'", "wandb>=0.19",
                 # Megatron's own data and model code, which tests/unit/test_*_megatron_core.py
                 # run beside ours (wheels for Linux x86-64; it needs torch, numpy, packaging)
                 "megatron-core==0.16.1; sys_platform == 'linux' and platform_machine == 'x86_64'"],
        "hf": ["transformers>=4.40", "safetensors"],
        "wandb": ["wandb>=0.19"],
        "deepspeed": ["deepspeed>=0.19"],
        "flash": ["flash-attn>=2.5"],
    },
)
