"""Build of the C++ CPU backend (csrc/ -> zokernels._C).

Plain C++17 + pybind11 + OpenMP, no libtorch: Python validates arguments and hands over raw
pointers, sizes and dtype codes. Build switches are environment variables:

  ZOKERNELS_NO_OPENMP=1   build without OpenMP (single-threaded kernels)
  ZOKERNELS_NATIVE=1      compile for the build machine's CPU (-march=native) instead of the
                          portable build with runtime dispatch between AVX2 and generic code
  ZOKERNELS_BUILD_JOBS=N  parallel compile jobs (default: number of CPUs)
  ZOKERNELS_DEBUG=1       -O0 -g
"""

import os
import platform
import sys
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def extension() -> Pybind11Extension:
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    compile_args: list[str] = []
    link_args: list[str] = []
    if sys.platform == "win32":
        compile_args += ["/O2", "/openmp", "/fp:precise"]
    else:
        if env_flag("ZOKERNELS_DEBUG"):
            compile_args += ["-O0", "-g"]
        else:
            compile_args += ["-O3"]
        # The reference does a multiply then an add; keep the compiler from fusing them so the
        # C++ path matches it bit for bit where the contract allows (rademacher, uniforms).
        compile_args += ["-ffp-contract=off", "-fno-math-errno"]
        # Nothing reads the FP exception flags; without this GCC will not if-convert (and so not
        # vectorize) the branch-free float16 / stochastic-rounding selects. Values are unchanged.
        compile_args += ["-fno-trapping-math"]
        if env_flag("ZOKERNELS_NATIVE"):
            compile_args += ["-march=native"]
        if not env_flag("ZOKERNELS_NO_OPENMP"):
            if sys.platform == "darwin":
                compile_args += ["-Xpreprocessor", "-fopenmp"]
                link_args += ["-lomp"]
            else:
                compile_args += ["-fopenmp"]
                link_args += ["-fopenmp"]
    # Headers hold most of the kernels: list them so that editing one triggers a rebuild.
    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h"))
    return Pybind11Extension(
        "zokernels._C",
        sources,
        depends=headers,
        include_dirs=[str(ROOT / "csrc")],
        cxx_std=17,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("ZOKERNELS_MACHINE", f'"{platform.machine()}"')],
    )


ParallelCompile("ZOKERNELS_BUILD_JOBS", default=0).install()

setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": build_ext},
    entry_points={},
    zip_safe=False,
)
