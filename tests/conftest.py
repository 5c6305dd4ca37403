"""Shared fixtures: the real models (fetched into the user cache on first use), the gguf package's reader of
each as the oracle (parsed once per session: it takes seconds per model), a helper to run the CLI, and the
GGUF fuzz engine of bench/ with the real qwen header laid out field by field."""

from __future__ import annotations

import importlib.util
import os
import shutil

# Without a GPU, CUDA kernels run in Numba's simulator. The variable is read when numba.cuda is first
# imported, which another test module may do before tests/test_kernels_cuda.py is collected: set it here.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not shutil.which("nvidia-smi"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from pyquant.models import model_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    """qwen2.5-coder-0.5b-instruct q4_k_m (~490 MB)."""
    return model_path("qwen")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """gemma-3-270m q4_k_m (~250 MB)."""
    return model_path("gemma")


@pytest.fixture(scope="session", params=["qwen", "gemma"])
def real_model(request) -> Path:
    """Each real model in turn."""
    return request.getfixturevalue(f"{request.param}_path")


@cache
def gguf_reader(path: Path):
    """gguf-py's GGUFReader of a file, once a session (the oracle of the reader and inspect tests)."""
    from gguf import GGUFReader

    return GGUFReader(path)


@pytest.fixture(scope="session")
def oracle():
    """gguf_reader as a fixture: `oracle(path)` is gguf-py's GGUFReader of `path`, cached."""
    return gguf_reader


@pytest.fixture(scope="session")
def cli():
    """run_cli as a fixture: `cli("inspect", path)` runs the real command line."""
    return run_cli


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`pyquant ARGS` in a fresh interpreter, as a user runs it; text output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYQUANT_DEBUG", None)
    cmd = [sys.executable, "-m", "pyquant.cli", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)


@cache
def load_fuzz_gguf():
    """bench/fuzz_gguf.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("fuzz_gguf", ROOT / "bench" / "fuzz_gguf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_gguf"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fuzz_gguf():
    return load_fuzz_gguf()


@pytest.fixture(scope="session")
def qwen_header(qwen_path, fuzz_gguf):
    """(Seed, Layout): the real qwen header bytes up to the tensor data, the file's size, and where each
    field of the header sits (keys, value types, array counts, tensor dims, types and offsets)."""
    seed = fuzz_gguf.real_header_seed(qwen_path)
    return seed, fuzz_gguf.layout(seed.head, strings_per_array=1)
