"""Build and install the LoCoRE engine.

Two packages and one compiled extension:
  * ``locore_kernels``      - the Longformer attention op (Triton GPU kernels, dense reference, dispatch)
  * ``locore``              - the model, checkpoint loading, re-ranking, evaluation and CLI (python/locore)
  * ``locore_kernels._cpu`` - the CPU attention kernel, C++17 + pybind11 + OpenMP (csrc/)

Set ``LOCORE_NO_OPENMP=1`` to build without OpenMP (e.g. macOS clang without libomp).
"""
import os
import sys

from setuptools import setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pragma: no cover - pybind11 is a build requirement (pyproject.toml)
    sys.exit("pybind11 is required to build the CPU extension: pip install pybind11")

use_openmp = os.environ.get("LOCORE_NO_OPENMP", "0") not in ("1", "true", "yes")
compile_args = ["-O3", "-std=c++17", "-march=native" if os.environ.get("LOCORE_NATIVE", "1") == "1" else "-mavx2"]
link_args = []
if use_openmp:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

ext = Pybind11Extension(
    "locore_kernels._cpu",
    sources=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
    depends=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".h", ".hpp"))),
    cxx_std=17,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    define_macros=[("LOCORE_OPENMP", "1" if use_openmp else "0")],
)

setup(
    name="locore",
    version="0.1.0",
    description="Fast, faithful inference engine for the LoCoRE long-context image re-ranker",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["locore_kernels", "locore", "locore.data", "locore.integrations"],
    package_dir={"locore_kernels": "locore_kernels", "locore": "python/locore"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    install_requires=[
        # torch and triton are not pinned here: users pick the build for their device (README, "GPU install").
        # The Makefile installs the CPU wheel (torch==2.13.0) and triton==3.6.0 before this package.
        "torch>=2.4",
        "triton>=3.2",
        "numpy>=1.24",
        "safetensors>=0.4",
        "h5py>=3.8",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6.100", "transformers>=4.40", "psutil>=5.9"],
        "bench": ["matplotlib>=3.7", "psutil>=5.9", "transformers>=4.40"],
        # first stage (`locore search`): exact flat search needs only torch; ivf / hnsw need FAISS
        "search": ["faiss-cpu>=1.7.4"],
    },
    entry_points={"console_scripts": ["locore=locore.cli:main"]},
    zip_safe=False,
)
