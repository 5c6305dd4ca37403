"""The real-model cache: names, aliases, checksums, and that a damaged file is never handed out."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from pyquant.errors import PyquantError
from pyquant.models import MODELS, model_path


def test_unknown_model_is_a_clear_error():
    with pytest.raises(PyquantError, match="unknown model 'llama-7b'.*known:"):
        model_path("llama-7b")


def test_cached_models_match_their_checksums(real_model):
    model = next(m for m in MODELS.values() if m.filename == real_model.name)
    h = hashlib.sha256()
    with open(real_model, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    assert h.hexdigest() == model.sha256
    if model.size:
        assert real_model.stat().st_size == model.size


def test_damaged_cache_is_not_trusted(tmp_path, monkeypatch, gemma_path):
    """A cached file whose bytes changed is re-checked (the marker alone is not trusted) and, with fetching
    off, reported rather than used."""
    monkeypatch.setenv("PYQUANT_CACHE", str(tmp_path))
    cache = tmp_path / "models"
    cache.mkdir()
    damaged = cache / gemma_path.name
    shutil.copyfile(gemma_path, damaged)
    assert model_path("gemma", fetch=False) == damaged  # a good copy is hashed once and marked
    assert damaged.with_suffix(".sha256ok").exists()
    with open(damaged, "r+b") as f:
        f.seek(1000)
        f.write(b"\0\1\2\3")
    with pytest.raises(PyquantError, match="not in .*pyquant fetch"):
        model_path("gemma", fetch=False)
