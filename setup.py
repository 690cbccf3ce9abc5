"""Packaging for prefopt.

``kernels/`` is installed as the subpackage ``prefopt.kernels`` (never as a top-level ``kernels``
module: that name belongs to another PyPI package that transformers imports), and ``bench/`` as
``prefopt.bench`` so that ``prefopt bench`` works from an installed copy.
"""
from setuptools import find_packages, setup

setup(
    name="prefopt",
    version="0.1.0",
    description="Fused GPU kernels for memory-efficient preference optimisation of vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["prefopt", "prefopt.*"])
    + ["prefopt.kernels", "prefopt.bench"],
    package_dir={"prefopt.kernels": "kernels", "prefopt.bench": "bench"},
    # The shipped grounded base of the embedded VLM (tiny-llava-sft, built by python -m prefopt.train.build_base) and
    # the config-only folders prefopt plan's README table is made from.
    package_data={"prefopt": ["assets/*.safetensors", "assets/configs/*/*.json"]},
    install_requires=["torch>=2.3", "numpy", "tqdm"],
    extras_require={
        # trl, datasets and liger-kernel pinned exactly: tests compare against them number for number.
        "test": ["pytest", "pytest-benchmark", "triton>=3.0", "liger-kernel==0.8.5", "trl==1.16.0", "datasets==5.2.0",
                 "transformers>=4.45", "peft", "safetensors", "deepspeed", "pillow", "accelerate", "bitsandbytes",
                 # SmolVLM's processor (transformers 5.25) refuses to load without it; the model-family tests build one.
                 "num2words"],
        "bench": ["triton>=3.0", "liger-kernel>=0.8", "cut-cross-entropy", "trl>=1.16", "matplotlib", "pytest-benchmark",
                  "psutil"],
        "train": ["transformers>=4.45", "deepspeed", "peft", "safetensors", "pillow", "accelerate", "matplotlib",
                  "bitsandbytes"],
        "gpu": ["triton>=3.0", "flash-attn"],
    },
    entry_points={"console_scripts": ["prefopt=prefopt.cli:main"]},
)
