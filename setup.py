"""Installs the top-level modules so `python algos/x.py` and torchrun find them without
PYTHONPATH. `make setup` runs `pip install --no-build-isolation -e .` (no isolation, so the
build sees the venv's torch instead of pulling a CUDA wheel into a build environment)."""
from setuptools import setup

setup(
    name="posttrain",
    version="0.1.0",
    description="Minimal from-scratch reference for LLM post-training and reasoning research",
    python_requires=">=3.10",
    py_modules=["model", "sampler", "plumbing"],
    packages=["data"],
    package_data={"data": ["tinytext.txt"]},
    extras_require={"plot": ["matplotlib"]},
)
