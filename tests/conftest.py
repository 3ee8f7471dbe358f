"""Test configuration.

Without a CUDA device the Triton kernels run under the interpreter on CPU tensors. The variable
must be set before triton is first imported, so it is set here, at collection start, never inside
a test.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zokernels  # noqa: E402  (after TRITON_INTERPRET)
from helpers import ALL_BACKEND_CASES, BACKEND_CASES  # noqa: E402

if "cpu" not in zokernels.available_backends() and os.environ.get("ZOKERNELS_ALLOW_NO_CPU") != "1":
    # Testing a source tree without the built extension would silently skip the cpu backend.
    from zokernels.backends.cpu import load_cpu_extension

    load_cpu_extension()  # raises with the build diagnostics


@pytest.fixture(params=BACKEND_CASES, ids=[f"{b}-{d}" for b, d in BACKEND_CASES])
def fast_case(request) -> tuple[str, str]:
    return request.param


@pytest.fixture(params=ALL_BACKEND_CASES, ids=[f"{b}-{d}" for b, d in ALL_BACKEND_CASES])
def any_case(request) -> tuple[str, str]:
    return request.param


def pytest_report_header(config):
    return [f"zokernels {zokernels.__file__}", f"zokernels backends: {zokernels.available_backends()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}, "
            f"cuda={torch.cuda.is_available()}"]
