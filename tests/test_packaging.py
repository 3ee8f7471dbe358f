"""The C++ extension: no libtorch dependency, and a missing extension fails late and clearly."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import zokernels

from helpers import SUBPROCESS_TIMEOUT

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_build_requirements_do_not_pull_torch():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = " ".join(pyproject["build-system"]["requires"]).lower()
    assert "torch" not in requires, "an isolated build would download a torch wheel"


@pytest.mark.skipif(sys.platform != "linux", reason="uses ldd")
def test_extension_does_not_link_libtorch():
    from zokernels.backends.cpu import load_cpu_extension

    library = load_cpu_extension().__file__
    linked = subprocess.run(["ldd", library], capture_output=True, text=True, check=True).stdout
    for name in ("libtorch", "libc10", "libpython"):
        assert name not in linked, f"{library} links {name}:\n{linked}"


def test_missing_extension_fails_only_when_used(tmp_path):
    """Simulate a failed build: import zokernels with zokernels._C unimportable."""
    script = textwrap.dedent("""
        import sys, warnings, importlib.abc

        class RefuseExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "zokernels._C":
                    raise ImportError("simulated: undefined symbol _ZN3foo")
                return None

        sys.meta_path.insert(0, RefuseExtension())
        import torch
        import zokernels                     # must not fail
        assert "cpu" not in zokernels.available_backends()
        t = torch.ones(10)
        try:
            zokernels.perturb_(t, 1, 1.0, backend="cpu")
        except RuntimeError as exc:
            message = str(exc)
            assert "simulated: undefined symbol" in message, message
            assert "pip install ." in message, message
        else:
            raise AssertionError("backend='cpu' did not raise")
        assert torch.equal(t, torch.ones(10)), "a refused call modified the tensor"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            zokernels.perturb_(t, 1, 1.0)   # auto falls back to the torch reference
        assert any("falling back" in str(w.message) for w in caught)
        expected = torch.ones(10) + zokernels.noise(10, 1, 0, backend="torch")
        assert torch.equal(t, expected)
        print("ok")
    """)
    package_parent = str(pathlib.Path(zokernels.__file__).resolve().parents[1])
    env = dict(os.environ, ZOKERNELS_BACKEND="", PYTHONPATH=package_parent)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_version():
    assert isinstance(zokernels.__version__, str) and zokernels.__version__.count(".") == 2
