"""pyquant convert: Hugging Face checkpoints -> GGUF, checked against transformers and llama.cpp.

Oracles:
- F32/F16 files: llama.cpp's logits on the converted file equal transformers' logits on the checkpoint
  (and pyquant.Model's, numpy backend), for tiny random llama, mistral, qwen2, gemma3 checkpoints (every
  parameter random: a wrong name, permutation or norm offset shows) and the real Qwen checkpoint.
- Quantized files: llama.cpp's own quantization of our F16 file (llama_model_quantize) chooses the same ggml
  type for every tensor; where the checkpoint is f16/bf16 both start from the same numbers and the bytes are
  identical; the mean NLL over WikiText tokens is within 1%.
- Tokenizer metadata: the real GGUF files (tokens, types, merges, special ids), and tokenization through
  llama.cpp equal to the HF tokenizer's / SentencePiece's.
Checkpoints come from converters.checkpoints, cached under ~/.cache/pyquant/hf (built on first use).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from converters import checkpoints
from converters.hf_to_gguf import convert
from converters.mixtures import tensor_types
from pyquant.errors import PyquantError
from pyquant.gguf import GGUFFile

llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WIKITEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2" / "test.txt"
ARCHS = ("llama", "mistral", "qwen2", "gemma3")
LLAMA_FTYPES = {
    "q8_0": "Q8_0",
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q5_0": "Q5_0",
    "q5_1": "Q5_1",
    "q4_k_m": "Q4_K_M",
    "q5_k_m": "Q5_K_M",
    "q6_k": "Q6_K",
}


# ---- helpers ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@cache
def checkpoint(name: str) -> Path:
    return (
        checkpoints.real_checkpoint(name[5:])
        if name.startswith("real-")
        else checkpoints.random_checkpoint(name)
    )


_converted: dict = {}


def converted(out_dir: Path, name: str, file_type: str) -> Path:
    """Our conversion of checkpoint `name` to `file_type`, once per module."""
    key = (name, file_type)
    if key not in _converted:
        _converted[key] = convert(checkpoint(name), out_dir / f"{name}-{file_type}.gguf", file_type)
    return _converted[key]


@contextlib.contextmanager
def llama(path: Path, n_ctx: int = 512, **kw):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, verbose=False, **kw)
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits with an f32 KV cache (the default f16 cache alone costs ~1e-3 relative error)."""
    with llama(path, n_ctx=max(64, len(ids)), logits_all=True, type_k=0, type_v=0, swa_full=True) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)


@cache
def hf_logits(name: str, ids: tuple[int, ...]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint(name)), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def random_ids(n: int, vocab: int, seed: int = 0) -> tuple[int, ...]:
    return tuple(int(i) for i in np.random.default_rng(seed).integers(5, min(vocab, 30000), n))


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def llama_quantize(src: Path, dst: Path, file_type: str) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_FTYPES[file_type]}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def wikitext_nll(path: Path, n_tokens: int = 320) -> float:
    """Mean next-token NLL of the first WikiText-2 test tokens (BOS first), from llama.cpp's logits."""
    text = WIKITEXT.read_text(encoding="utf-8")[:20000]
    with llama(path, n_ctx=n_tokens, logits_all=True) as llm:
        ids = llm.tokenize(text.encode(), add_bos=True)[:n_tokens]
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def compare_with_llama_quantize(out_dir: Path, name: str, file_type: str, same_bytes: bool) -> None:
    ours = converted(out_dir, name, file_type)
    ref = llama_quantize(
        converted(out_dir, name, "f16"), out_dir / f"{name}-{file_type}-llama.gguf", file_type
    )
    a, b = GGUFFile(ours), GGUFFile(ref)
    assert sorted(a.tensors) == sorted(b.tensors)
    wrong = {n: (a.tensors[n].type, t.type) for n, t in b.tensors.items() if a.tensors[n].type != t.type}
    assert not wrong, f"tensor types (ours, llama.cpp) differ: {wrong}"
    if same_bytes:
        differ = [n for n, t in b.tensors.items() if not np.array_equal(a.tensors[n].data, t.data)]
        assert not differ, f"bytes differ from llama.cpp's quantization in {differ}"
    nll_ours, nll_ref = wikitext_nll(ours), wikitext_nll(ref)
    if same_bytes:
        assert nll_ours == nll_ref
    assert abs(nll_ours - nll_ref) < 0.01 * nll_ref, (nll_ours, nll_ref)  # mean NLL within 1%
    if name.startswith("real-"):  # a trained model: its perplexity within 1% too
        assert abs(np.exp(nll_ours - nll_ref) - 1) < 0.01, (nll_ours, nll_ref)


# ---- float conversions vs transformers -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_float_logits_match_transformers(out_dir, arch):
    vocab = json.loads((checkpoint(arch) / "config.json").read_text())["vocab_size"]
    ids = random_ids(48, vocab)
    ref = hf_logits(arch, ids)
    f32 = converted(out_dir, arch, "f32")
    # gemma's GELU goes through ggml's float16 lookup table on CPU (pyquant follows it): ~5e-4 on its own
    tol = 1e-3 if arch == "gemma3" else 1e-4
    assert rel_err(llama_logits(f32, list(ids)), ref) < tol
    assert rel_err(llama_logits(converted(out_dir, arch, "f16"), list(ids)), ref) < 1e-2
    import pyquant

    model = pyquant.Model(f32, n_ctx=64, backend="numpy", cache_type="f32")
    assert rel_err(model.logits(ids), ref) < tol


@pytest.mark.parametrize(
    "arch, rope",
    [
        (
            "llama",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 500000.0,
            },
        ),
        ("llama", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
        (
            "qwen2",
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 10000.0,
            },
        ),
    ],
    ids=["llama3", "linear", "yarn"],
)
def test_rope_scaling_matches_transformers(out_dir, arch, rope):
    folder = checkpoints.random_checkpoint(arch, rope_parameters=rope)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = random_ids(96, 1000)  # past original_max_position_embeddings: the scaling shows
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    out = convert(folder, out_dir / f"rope-{rope['rope_type']}.gguf", "f32")
    assert rel_err(llama_logits(out, list(ids)), ref) < 1e-4


def test_real_qwen_f16_logits_and_metadata(out_dir, qwen_path):
    ids = random_ids(32, 151643, seed=1)
    out = converted(out_dir, "real-qwen", "f16")
    assert rel_err(llama_logits(out, list(ids)), hf_logits("real-qwen", ids)) < 1e-2
    ours, real = GGUFFile(out), GGUFFile(qwen_path)
    skip = ("general.", "tokenizer.ggml.add_eos_token")
    for key, value in real.metadata.items():
        if key.startswith(skip):
            continue
        assert ours.metadata_types[key] == real.metadata_types[key], key
        assert np.array_equal(np.asarray(ours.metadata[key]), np.asarray(value)), key
    assert ours.metadata["general.file_type"] == 1 and ours.metadata["general.quantization_version"] == 2


# ---- quantized conversions vs llama.cpp's quantization of our F16 file ------------------------------------------


@pytest.mark.parametrize("file_type", list(LLAMA_FTYPES))
def test_quantized_bytes_match_llama_cpp(out_dir, file_type):
    # the mistral checkpoint is f16: llama.cpp quantizes the same numbers we do, so the files are identical
    compare_with_llama_quantize(out_dir, "mistral", file_type, same_bytes=True)


@pytest.mark.parametrize(
    "name, file_type",
    [("llama", "q4_k_m"), ("llama", "q5_k_m"), ("llama", "q6_k"), ("qwen2", "q4_k_m"), ("gemma3", "q4_k_m")],
)
def test_quantized_types_and_nll_match_llama_cpp(out_dir, name, file_type):
    compare_with_llama_quantize(out_dir, name, file_type, same_bytes=False)
    # pyquant's runtime reads the quantized file too; its rounding differs from llama.cpp's CPU kernels by ~2%
    import pyquant

    ids = random_ids(32, 1000)
    path = converted(out_dir, name, file_type)
    with llama(path, n_ctx=64, logits_all=True) as llm:
        llm.eval(list(ids))
        ref = np.array(llm.scores[: len(ids)], dtype=np.float32)
    got = pyquant.Model(path, n_ctx=64, backend="numpy").logits(ids)
    assert rel_err(got, ref) < 0.05 and (got.argmax(1) == ref.argmax(1)).mean() > 0.9


def test_real_qwen_q4_k_m_matches_llama_cpp(out_dir):
    # 896-wide rows: K-quants fall back to Q5_0/Q8_0 exactly where llama.cpp's do; bf16 weights: same bytes
    compare_with_llama_quantize(out_dir, "real-qwen", "q4_k_m", same_bytes=True)


def test_mixture_matches_real_gemma_file(gemma_path):
    f = GGUFFile(gemma_path)  # made by a llama.cpp that counts layers in numeric order, as the installed one
    chosen = tensor_types("q4_k_m", {n: t.shape for n, t in f.tensors.items()}, n_layers=18)
    assert chosen == {n: t.type for n, t in f.tensors.items()}


# ---- tokenizers ---------------------------------------------------------------------------------------------------


def wikitext_lines(n: int = 120) -> list[str]:
    lines = [s for s in WIKITEXT.read_text(encoding="utf-8").split("\n") if s.strip()][:n]
    return lines + ["Hello  world\n\n  x", "tabs\t\there", "emoji 🦙 and 我想 ÿ", "a  b   c    d", " lead"]


@pytest.mark.parametrize("arch, real", [("qwen2", "qwen"), ("gemma3", "gemma")])
def test_vocab_matches_real_gguf(out_dir, arch, real, request):
    real_path = request.getfixturevalue(f"{real}_path")
    ours_path = converted(out_dir, arch, "f16")
    ours, ref = GGUFFile(ours_path).metadata, GGUFFile(real_path).metadata
    for key in (
        "model",
        "pre",
        "bos_token_id",
        "eos_token_id",
        "padding_token_id",
        "add_bos_token",
        "merges",
    ):
        key = f"tokenizer.ggml.{key}"
        assert np.array_equal(np.asarray(ours.get(key)), np.asarray(ref.get(key))), key
    tokens, ref_tokens = ours["tokenizer.ggml.tokens"], ref["tokenizer.ggml.tokens"]
    assert len(tokens) == len(ref_tokens)
    types, ref_types = ours["tokenizer.ggml.token_type"], ref["tokenizer.ggml.token_type"]
    # transformers keeps Gemma's whitespace pieces ("▁▁"...) as plain BPE pieces, not as user-defined "  "
    differ = [i for i in range(len(tokens)) if tokens[i] != ref_tokens[i] or types[i] != ref_types[i]]
    assert all(set(tokens[i]) == {"▁"} for i in differ) and len(differ) <= 31
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(checkpoint(arch) / "tokenizer.json"))
    with llama(ours_path, vocab_only=True) as a, llama(real_path, vocab_only=True) as b:
        for line in wikitext_lines():
            got = a.tokenize(line.encode(), add_bos=False, special=True)
            assert got == b.tokenize(line.encode(), add_bos=False, special=True), line
            assert got == hf.encode(line, add_special_tokens=False).ids, line


def test_sentencepiece_tokenization(out_dir):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromFile(str(checkpoint("llama") / "tokenizer.model"))
    path = converted(out_dir, "llama", "f16")
    meta = GGUFFile(path).metadata
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.token_type"][3] == 3  # <|end|>, a control piece
    with llama(path, vocab_only=True) as llm:
        for line in wikitext_lines():
            assert llm.tokenize(line.encode(), add_bos=True) == [sp.bos_id(), *sp.encode(line)], line


# ---- metadata, CLI and bad input ------------------------------------------------------------------------------------


def test_hparams_metadata(out_dir):
    meta = GGUFFile(converted(out_dir, "gemma3", "f16"))
    u32, f32 = "UINT32", "FLOAT32"
    expect = {
        "context_length": (u32, 512),
        "embedding_length": (u32, 128),
        "block_count": (u32, 6),
        "feed_forward_length": (u32, 256),
        "attention.head_count": (u32, 2),
        "attention.head_count_kv": (u32, 1),
        "attention.key_length": (u32, 48),
        "attention.value_length": (u32, 48),
        "attention.sliding_window": (u32, 16),
        "rope.freq_base": (f32, 1e6),
        "attention.layer_norm_rms_epsilon": (f32, 1e-6),
    }
    for key, (vtype, value) in expect.items():
        assert meta.metadata_types[f"gemma3.{key}"][0].name == vtype, key
        assert meta.metadata[f"gemma3.{key}"] == pytest.approx(value), key
    assert "output.weight" not in meta.tensors  # tied embeddings
    mistral = GGUFFile(converted(out_dir, "mistral", "f16"))
    assert mistral.metadata["llama.attention.key_length"] == 32  # head_dim != n_embd / n_head
    assert (
        mistral.tensors["output.weight"].type == "f16"
        and mistral.tensors["blk.0.attn_norm.weight"].type == "f32"
    )


def test_gemma3_multimodal_wrapper(tmp_path, out_dir):
    """Gemma3ForConditionalGeneration: config under text_config, weights under model.language_model., a vision
    tower to skip; the text model converts to the same file as the plain causal LM."""
    from safetensors.numpy import save_file

    from converters.safetensors_io import TensorSource

    src, folder = checkpoint("gemma3"), tmp_path / "mm"
    folder.mkdir()
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, folder / f.name)
    text = json.loads((src / "config.json").read_text())
    config = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text,
        "vision_config": {"hidden_size": 8},
        "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    source = TensorSource(src)
    tensors = {n.replace("model.", "model.language_model.", 1): source.load(n) for n in source.names()}
    tensors["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros(
        (8, 4), np.float32
    )
    tensors["model.multi_modal_projector.mm_soft_emb_norm.weight"] = np.zeros(8, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    a = GGUFFile(convert(folder, tmp_path / "mm.gguf", "f16"))
    b = GGUFFile(converted(out_dir, "gemma3", "f16"))
    assert list(a.tensors) == list(b.tensors)
    assert all(np.array_equal(a.tensors[n].data, t.data) for n, t in b.tensors.items())
    for key, value in b.metadata.items():
        if key != "general.name":
            assert np.array_equal(np.asarray(a.metadata[key]), np.asarray(value)), key


def test_cli_convert(tmp_path, cli):
    out = tmp_path / "tiny.gguf"
    r = cli("convert", str(checkpoint("llama")), "-o", str(out), "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    assert GGUFFile(out).tensors["blk.0.attn_q.weight"].type == "q8_0"
    r = cli("convert", str(checkpoint("llama")), "-o", str(out), "--type", "q3_k")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "invalid choice" in r.stderr


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(tmp_path, cli):
    folder = _copy_checkpoint(checkpoint("llama"), tmp_path / "ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    r = cli("convert", str(folder), "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "gpt_neox" in r.stderr and all(a in r.stderr for a in ("llama", "mistral", "qwen2", "gemma3_text"))


def test_missing_config_and_folder(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    r = cli("convert", str(tmp_path / "empty"), "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "no config.json" in r.stderr and r.stderr.count("\n") == 1
    r = cli("convert", str(tmp_path / "nope"), "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "not a folder" in r.stderr


def test_missing_tensor(tmp_path):
    from safetensors.numpy import save_file

    from converters.safetensors_io import TensorSource

    folder = _copy_checkpoint(checkpoint("llama"), tmp_path / "ckpt")
    src = TensorSource(folder)
    tensors = {n: src.load(n) for n in src.names() if n != "model.layers.1.mlp.down_proj.weight"}
    del src
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(PyquantError, match=r"missing tensor 'model.layers.1.mlp.down_proj.weight'"):
        convert(folder, tmp_path / "x.gguf", "f16")


def test_output_in_missing_folder(tmp_path, cli):
    r = cli("convert", str(checkpoint("llama")), "-o", str(tmp_path / "no" / "x.gguf"))
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.count("\n") == 1


def test_interrupted_conversion_leaves_output_untouched(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous contents")

    def interrupt(done, total, name):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(checkpoint("llama"), out, "q4_k_m", progress=interrupt)
    assert out.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temp file left behind
