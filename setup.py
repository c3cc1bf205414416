"""Build script for dinovmf.

The Python package lives in ``dinovmf/``; the Triton kernels live in ``kernels/`` and are installed as
``dinovmf.kernels`` (PyPI already has an unrelated top-level ``kernels`` package, so we never expose
that name). The C++ CPU extension ``dinovmf._C`` is built everywhere; GPUs run the Triton kernels (the
CUDA C++ twin was retired: one implementation per device is easier to trust than two).

Install with ``pip install --no-build-isolation -e .`` (the Makefile does this): building against the
torch that is already installed avoids pip fetching a second, CUDA, torch into an isolated build env.
"""
import os
import re
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "dinovmf", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def extensions():
    """The C++ CPU extension; none if torch is not importable or DINOVMF_NO_EXT=1."""
    if os.environ.get("DINOVMF_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    cpu_src = [os.path.join("csrc", f) for f in sorted(os.listdir(os.path.join(HERE, "csrc"))) if f.endswith(".cpp")]
    exts = [CppExtension("dinovmf._C", cpu_src, extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp"]},
                         extra_link_args=["-fopenmp"])]
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extensions()

setup(
    name="dinovmf",
    version=read_version(),
    description="Fast, trustworthy DINO-vMF / iBOT-vMF self-supervised pretraining",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dinovmf", "dinovmf.*"]) + ["dinovmf.kernels", "dinovmf.configs"],
    package_dir={"dinovmf.kernels": "kernels", "dinovmf.configs": "configs"},
    package_data={"dinovmf.configs": ["*.yaml"]},
    install_requires=[
        # The Makefile installs torch==2.13.0 (CPU) first and constrains pip to the installed torch, so
        # this range never pulls a second (CUDA) torch; a user's existing CUDA torch satisfies it too.
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "safetensors",
    ],
    extras_require={
        "triton": ["triton==3.9.0"],
        "ffcv": ["ffcv==1.0.2"],
        "test": ["pytest", "scipy", "mpmath"],
    },
    entry_points={"console_scripts": ["dinovmf = dinovmf.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
