"""Calibration data: fixed-length token windows cut at seeded random offsets from a text file.

The default text is WikiText-2's validation split (`<repo>/../shared/data/wikitext-2/valid.txt`); the test
split is what `pyquant eval` scores, so calibrating on it is refused. Tokens come from the checkpoint's own
tokenizer (transformers), as the model saw them in training. Defaults (32 windows of 512 tokens, 16k tokens)
keep a 0.5B model's calibration to tens of minutes on two CPU cores; the GPTQ and AWQ papers use 128 x 2048
and 128 x 512 on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pyquant.errors import PyquantError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


@dataclass(frozen=True)
class CalibConfig:
    text: Path = DEFAULT_TEXT
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0

    def metadata(self) -> dict:
        return {
            "pyquant.calibration.text": Path(self.text).name,
            "pyquant.calibration.samples": self.n_samples,
            "pyquant.calibration.seq_len": self.seq_len,
            "pyquant.calibration.seed": self.seed,
        }


def check_text(path: Path) -> Path:
    path = Path(path)
    if path.name == "test.txt" and path.parent.name.startswith("wikitext"):
        raise PyquantError(f"{path}: the WikiText test split is the evaluation set; calibrate on valid.txt")
    if not path.is_file():
        raise PyquantError(f"{path}: calibration text not found")
    return path


def read_text(path: Path) -> str:
    path = check_text(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise PyquantError(f"{path}: cannot read calibration text: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PyquantError(f"{path}: calibration text is not UTF-8") from None


@lru_cache(maxsize=4)
def _token_ids(hf_dir: str, text: str, stamp: float) -> np.ndarray:
    text = read_text(Path(text))
    spm = Path(hf_dir) / "tokenizer.model"
    if not (Path(hf_dir) / "tokenizer.json").exists() and spm.exists():  # SentencePiece-only checkpoints
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        sp.LoadFromFile(str(spm))
        return np.asarray(sp.EncodeAsIds(text), dtype=np.int64)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def calibration_tokens(hf_dir: Path, cfg: CalibConfig) -> np.ndarray:
    """int64 (n_samples, seq_len) windows of the tokenized text."""
    if cfg.n_samples < 1 or cfg.seq_len < 2:
        raise PyquantError(f"need at least 1 sample of 2 tokens, got {cfg.n_samples} x {cfg.seq_len}")
    text = check_text(cfg.text)
    ids = _token_ids(str(hf_dir), str(text), text.stat().st_mtime)
    if len(ids) <= cfg.seq_len:
        raise PyquantError(f"{cfg.text}: {len(ids)} tokens, fewer than one window of {cfg.seq_len}")
    rng = np.random.default_rng(cfg.seed)
    starts = rng.integers(0, len(ids) - cfg.seq_len, size=cfg.n_samples)
    return np.stack([ids[s : s + cfg.seq_len] for s in starts])
