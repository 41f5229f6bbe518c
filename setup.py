"""Installs the top-level modules so `python algos/x.py` and torchrun find them without
PYTHONPATH, and builds kernels.cu as the extension `kernels_cuda` when nvcc and a CUDA build of
torch are present (otherwise kernels.py uses its torch path, and this says so).

`make setup` runs `pip install --no-build-isolation -e .`: no isolation, so the build sees the
venv's torch instead of pulling a CUDA wheel into a build environment. On a GPU box,
`python setup.py build_ext --inplace` builds the extension next to kernels.py."""
from setuptools import setup


def cuda_extension():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("kernels.cu: skipped (torch is not installed yet)")
        return {}
    if torch.version.cuda is None:
        print("kernels.cu: skipped (this torch is a CPU build); kernels.py will use its torch path")
        return {}
    if CUDA_HOME is None:
        print("kernels.cu: skipped (nvcc / CUDA toolkit not found); kernels.py will use its torch path")
        return {}
    ext = CUDAExtension("kernels_cuda", ["kernels.cu"],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="posttrain",
    version="0.1.0",
    description="Minimal from-scratch reference for LLM post-training and reasoning research",
    python_requires=">=3.10",
    py_modules=["model", "sampler", "plumbing", "kernels", "rl"],
    packages=["data"],
    package_data={"data": ["tinytext.txt"]},
    extras_require={"plot": ["matplotlib"]},
    **cuda_extension(),
)
