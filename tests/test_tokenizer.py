"""Tokenizer tests: pyquant.tokenizer against llama.cpp, on both real models (Qwen2.5 gpt2/qwen2, Gemma 3 SPM).

Two oracles: golden JSON recorded from llama.cpp by bench/record_tokenizer_golden.py (always run), and
llama.cpp itself through llama-cpp-python's C API when it is importable (CI installs it). The live tests also
cover pre-tokenizers and flags the two models don't use, on their vocabularies rewritten into tensorless
GGUF files (tokenizer.ggml.pre = gpt-2, llama-bpe, default, ...; add_space_prefix; phi-3's rstrip).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import random
import time
from functools import cache
from pathlib import Path

import pytest

from pyquant.errors import PyquantError
from pyquant.gguf import GGUFFile, write_gguf
from pyquant.models import model_path
from pyquant.tokenizer import StreamDecoder, Tokenizer

GOLDEN = Path(__file__).parent / "golden"
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"
MODELS = ("qwen", "gemma")

# ---------------------------------------------------------------- corpus

SPECIAL_STRINGS = [
    "",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWrite code.<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nhello<end_of_turn>",
    "<bos>",
    "<eos>",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "<unk> <pad> <mask> <unused0> <unused6241> </s> <s> [multimodal] <start_of_image><end_of_image>",
    "<|im_start|><|im_start|><|im_end|>",
    "<|im_start <|im_end| |im_end|> <|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<|file_sep|><|repo_name|>x<|fim_pad|>",
    "  <|im_end|>  ",
    "<end_of_turn>\n\n<start_of_turn>",
    "<0x41><0xE4>",
]
CODE = [
    "def reverse(s: str) -> str:\n    return s[::-1]\n",
    'if __name__ == "__main__":\n\tprint(f"{x!r:>10}")  # comment\n',
    '#include <stdio.h>\nint main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    '{"key": [1, 2.5e-3, null, true], "nested": {"a": "b"}}',
    "<html><body class='x'>&amp; &lt;tag&gt;</body></html>",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * c; }\r\n",
    "x=1;y=2\n\n\n\nz = x**y // 3 % 4 != 5 >= 6 <= 7 -> 8 => 9 ::",
    "    \n        indented\n\t\t\ttabs\n",
    "SELECT * FROM t WHERE a='it''s' AND b LIKE '%x%';",
]
UNICODE = [
    "héllo wörld, ça va? Ñandú. ÆØÅ æøå ß İstanbul ǅ",
    "e\u0301 a\u0308 n\u0303 \u0301\u0301 combining",
    "中文测试，这是一个句子。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "مرحبا بالعالم ٣٤٥ שלום עולם",
    "हिन्दी पाठ ไทย ภาษา ქართული Ελληνικά Русский текст",
    "😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ 🫨 🩷 🫠 ✨🔥",
    "😀😀😀😀😀😀😀😀😀😀",
    "ｆｕｌｌ ｗｉｄｔｈ ０１２３ ½ ² ³ Ⅻ ∑∫√∞ ≠ ≤ °C €100 £5 ¥3",
    "\ufeffBOM \u200bzero\u200dwidth \ue000private \U0010fffd \U000e0001",
    "▁leading ▁▁ the▁word ▁",
    "\x00\x01\x07\x1b[31mred\x1b[0m\x7f",
    "ǂ ʼn ŉ ẞ ꞵ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
]
WHITESPACE = [
    " ",
    "\n",
    "  ",
    "\t",
    "\n\n\n",
    " \n ",
    "a  b   c    d",
    "trailing   ",
    "   leading",
    "tab\tsep\t\tdouble\t\t\ttriple",
    "line\r\nwindows\r\n\r\n",
    "nbsp\u00a0here\u3000ideo\u2028ls\u2029ps\x0bvt\x0cff\x85nel",
    " " * 40 + "x",
    "\n" * 40,
    "\t" * 35,
    " \t \n \t\n",
]
NUMBERS = [
    "1234567890",
    "3.14159 2.71828 -0.5 1e10 0x1F 0b1010",
    "1,000,000 12:30:45 2024-01-01",
    "٣٤٥ ١٢ ０１２ ²³",
    "I'm don't we'LL they'RE it's 'S 'll '' ' s rock'n'roll o'clock",
    "a" * 300,
    "ab" * 150,
]


def wikitext_lines(n: int = 300) -> list[str]:
    lines = WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True)
    picked = [line for line in lines if line.strip()]
    return picked[:: max(1, len(picked) // n)][:n]


@cache
def wikitext_text() -> str:
    return WIKITEXT.read_text(encoding="utf-8")


def fuzz(n: int = 120, seed: int = 0) -> list[str]:
    atoms = list("abcXYZ019 \t\n\r'.,!?-_<>|▁") + [
        *"éßİ\u0301中文アー한ب٣²½\u00a0\u3000\u2028😀\u200d🫨\ue000ǅ",
        "👍🏽",
        "<|im_end|>",
        "<|im_start|>",
        "<end_of_turn>",
        "<unk>",
        "\n\n",
        "  ",
        "'s",
        "'RE",
        "123",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def extras() -> list[str]:
    return SPECIAL_STRINGS + CODE + UNICODE + WHITESPACE + NUMBERS + fuzz()


def corpus() -> list[str]:
    return extras() + (wikitext_lines() if WIKITEXT.exists() else [])


def ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def lines_digest(tokenize, lines: list[str]) -> str:
    return hashlib.sha256(
        "\n".join(",".join(map(str, tokenize(line))) for line in lines).encode()
    ).hexdigest()


# ---------------------------------------------------------------- fixtures


@cache
def metadata(name: str) -> dict:
    return GGUFFile(model_path(name)).metadata


@cache
def tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_metadata(metadata(name))


@cache
def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"tokenizer_{name}.json").read_text(encoding="utf-8"))


class LlamaOracle:
    """llama.cpp's tokenizer through llama-cpp-python's C API (llama_tokenize, llama_detokenize, ...)."""

    def __init__(self, name_or_path: str):
        import llama_cpp

        path = name_or_path if name_or_path.endswith(".gguf") else str(model_path(name_or_path))
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        self.vocab = self.llm._model.vocab

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n = len(data) + 8
        buf = (self.lib.llama_token * n)()
        k = self.lib.llama_tokenize(self.vocab, data, len(data), buf, n, add_special, parse_special)
        assert k >= 0, f"llama_tokenize returned {k}"
        return list(buf[:k])

    def detokenize(self, ids: list[int], remove_special: bool = False, unparse_special: bool = True) -> bytes:
        arr = (self.lib.llama_token * max(1, len(ids)))(*ids)
        n = 64 + 256 * len(ids)
        out = ctypes.create_string_buffer(n)
        k = self.lib.llama_detokenize(self.vocab, arr, len(ids), out, n, remove_special, unparse_special)
        assert k >= 0, f"llama_detokenize returned {k}"
        return out.raw[:k]

    def piece(self, token: int, special: bool = True) -> bytes:
        out = ctypes.create_string_buffer(512)
        k = self.lib.llama_token_to_piece(self.vocab, token, out, 512, 0, special)
        return out.raw[:k]

    def n_vocab(self) -> int:
        return self.lib.llama_vocab_n_tokens(self.vocab)

    def bos(self) -> int:
        return self.lib.llama_vocab_bos(self.vocab)

    def eos(self) -> int:
        return self.lib.llama_vocab_eos(self.vocab)

    def eog_ids(self) -> set[int]:
        return {i for i in range(self.n_vocab()) if self.lib.llama_vocab_is_eog(self.vocab, i)}


_oracles: dict[str, LlamaOracle] = {}


def oracle(name_or_path: str) -> LlamaOracle:
    pytest.importorskip("llama_cpp")
    if name_or_path not in _oracles:
        _oracles[name_or_path] = LlamaOracle(name_or_path)
    return _oracles[name_or_path]


@pytest.fixture(scope="module", autouse=True)
def _close_oracles():
    """Free llama.cpp's models before interpreter shutdown, where llama-cpp-python's __del__ fails noisily."""
    yield
    while _oracles:
        _oracles.popitem()[1].llm.close()


def first_diff(ours: list, ref: list) -> str:
    k = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    return f"first difference at {k}: ours {ours[k : k + 8]} llama.cpp {ref[k : k + 8]}"


def compare_encode(tok: Tokenizer, ref_tokenize, texts: list[str], combos) -> list[str]:
    bad = []
    for text in texts:
        for add_special, parse_special in combos:
            ours, ref = (
                tok.encode(text, add_special, parse_special),
                ref_tokenize(text, add_special, parse_special),
            )
            if ours != ref:
                bad.append(
                    f"{text[:60]!r} add_special={add_special} parse_special={parse_special}: {first_diff(ours, ref)}"
                )
    return bad


ALL_COMBOS = [(a, p) for a in (True, False) for p in (True, False)]

# ---------------------------------------------------------------- golden (always run)


@pytest.mark.parametrize("name", MODELS)
def test_ids_and_eog_match_golden(name):
    tok, g = tokenizer(name), golden(name)
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.eot_id) == (
        g["n_vocab"],
        g["bos_id"],
        g["eos_id"],
        g["eot_id"],
    )
    assert sorted(tok.eog_ids) == g["eog_ids"]


@pytest.mark.parametrize("name", MODELS)
def test_encode_decode_match_golden(name):
    tok, g = tokenizer(name), golden(name)
    bad = []
    for case in g["cases"]:
        text = case["text"]
        for combo in ALL_COMBOS:
            key = f"ids_{int(combo[0])}{int(combo[1])}"
            if tok.encode(text, *combo) != case[key]:
                bad.append(f"{text[:60]!r} {key}: {first_diff(tok.encode(text, *combo), case[key])}")
        for key, decoded in case["decoded"].items():
            ours = tok.decode_bytes(case["ids_11"], special=key[0] == "1", remove_special=key[1] == "1")
            if ours != (bytes.fromhex(decoded[4:]) if decoded.startswith("hex:") else decoded.encode()):
                bad.append(f"{text[:60]!r} decode {key}: {ours!r} vs {decoded!r}")
    assert not bad, f"{len(bad)} mismatches of {len(g['cases'])} texts:\n" + "\n".join(bad[:20])


@pytest.mark.skipif(not WIKITEXT.exists(), reason="WikiText-2 not in shared/data")
@pytest.mark.parametrize("name", MODELS)
def test_wikitext_matches_golden(name):
    """Every WikiText-2 test line on its own, then the whole 1.2 MB file as one text."""
    tok, g = tokenizer(name), golden(name)
    lines = wikitext_lines(g["wikitext_lines"]["n"])
    assert lines_digest(tok.encode, lines) == g["wikitext_lines"]["sha256"]
    t = time.perf_counter()
    ids = tok.encode(wikitext_text())
    seconds = time.perf_counter() - t
    assert (len(ids), ids_digest(ids)) == (g["wikitext_test"]["n_tokens"], g["wikitext_test"]["sha256"])
    assert seconds < 30, f"{len(ids)} tokens took {seconds:.1f} s"
    assert tok.decode(ids, remove_special=True) == wikitext_text()


# ---------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", MODELS)
def test_stream_decoder_equals_decode(name):
    tok = tokenizer(name)
    for text in UNICODE + SPECIAL_STRINGS + fuzz(30, seed=1):
        ids = tok.encode(text)
        dec = StreamDecoder(tok)
        streamed = "".join(dec.feed(t) for t in ids) + dec.flush()
        assert streamed == tok.decode(ids), text


def test_stream_decoder_holds_split_characters():
    tok = tokenizer("gemma")
    ids = tok.encode("🫨", add_special=False)  # no token: four byte-fallback tokens
    assert len(ids) == 4 and all(tok.token_to_piece(t) in {b"\xf0", b"\x9f", b"\xab", b"\xa8"} for t in ids)
    dec = StreamDecoder(tok)
    assert [dec.feed(t) for t in ids] == ["", "", "", "🫨"]


def test_special_ids_and_eog():
    qwen, gemma = tokenizer("qwen"), tokenizer("gemma")
    assert qwen.texts[qwen.eos_id] == "<|im_end|>" and qwen.is_eog(qwen.token_to_id["<|endoftext|>"])
    assert gemma.texts[gemma.eot_id] == "<end_of_turn>" and gemma.is_eog(gemma.eos_id)
    assert gemma.encode("hi")[0] == gemma.bos_id and qwen.encode("hi") == qwen.encode("hi", add_special=False)


def test_parse_special_off_spells_control_tokens():
    tok = tokenizer("qwen")
    assert tok.encode("<|im_end|>") == [tok.token_to_id["<|im_end|>"]]
    assert len(tok.encode("<|im_end|>", parse_special=False)) > 1
    assert tok.decode(tok.encode("<|im_end|>x"), special=False) == "x"


def test_errors_name_the_problem():
    meta = dict(metadata("qwen"))
    with pytest.raises(PyquantError, match="'no-such-pre'"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(PyquantError, match="'bert'"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(PyquantError, match="outside the vocabulary"):
        tokenizer("qwen").decode([10**7])


def test_metadata_as_lists_or_arrays():
    meta = metadata("gemma")
    listed = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in meta.items()}
    text = UNICODE[2] + CODE[0]
    assert Tokenizer.from_metadata(listed).encode(text) == tokenizer("gemma").encode(text)


# ---------------------------------------------------------------- live llama.cpp (when llama-cpp-python is installed)


@pytest.mark.parametrize("name", MODELS)
def test_live_encode_matches_llama_cpp(name):
    ref, tok = oracle(name), tokenizer(name)
    texts = corpus()
    bad = compare_encode(tok, ref.tokenize, texts, ALL_COMBOS)
    assert not bad, f"{len(bad)} mismatches over {len(texts)} texts x 4:\n" + "\n".join(bad[:20])
    if WIKITEXT.exists():
        ours, theirs = tok.encode(wikitext_text()), ref.tokenize(wikitext_text())
        assert ours == theirs, first_diff(ours, theirs)


@pytest.mark.parametrize("name", MODELS)
def test_live_decode_matches_llama_cpp(name):
    ref, tok = oracle(name), tokenizer(name)
    rng = random.Random(0)
    sequences = [tok.encode(text) for text in extras()]
    sequences += [[rng.randrange(tok.n_vocab) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    sequences += [[tok.bos_id, *s, tok.eos_id] for s in sequences[:50]]
    for ids in sequences:
        for special in (True, False):
            for remove in (True, False):
                assert tok.decode_bytes(ids, special, remove) == ref.detokenize(ids, remove, special), ids


@pytest.mark.parametrize("name", MODELS)
def test_live_every_piece_matches_llama_cpp(name):
    ref, tok = oracle(name), tokenizer(name)
    assert (tok.n_vocab, tok.bos_id, tok.eos_id) == (ref.n_vocab(), ref.bos(), ref.eos())
    assert tok.eog_ids == ref.eog_ids()
    bad = [
        t for t in range(tok.n_vocab) for s in (True, False) if tok.token_to_piece(t, s) != ref.piece(t, s)
    ]
    assert not bad, f"{len(bad)} pieces differ, e.g. {bad[:10]}"


# other pre-tokenizers and flags, on the real vocabularies rewritten as tensorless GGUF files
VARIANTS = {
    "qwen-gpt-2-phi3": ("qwen", {"tokenizer.ggml.pre": "gpt-2", "general.name": "Phi-3 mini"}),  # rstrip
    "qwen-llama-bpe": ("qwen", {"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_eos_token": True}),
    "qwen-default": ("qwen", {"tokenizer.ggml.pre": "default"}),
    "qwen-starcoder": ("qwen", {"tokenizer.ggml.pre": "starcoder"}),
    "gemma-prefix": (
        "gemma",
        {"tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.add_eos_token": True},
    ),
}


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer_variants")


@pytest.mark.parametrize("variant", VARIANTS)
def test_live_variant_matches_llama_cpp(variant, variant_dir):
    pytest.importorskip("llama_cpp")
    base, changes = VARIANTS[variant]
    source = GGUFFile(model_path(base))
    meta = {k: v for k, v in source.metadata.items() if not k.startswith("tokenizer.chat_template")}
    meta |= changes
    path = variant_dir / f"{variant}.gguf"
    write_gguf(path, meta, [], types=source.metadata_types)
    ref, tok = oracle(str(path)), Tokenizer.from_metadata(meta)
    texts = extras() + (wikitext_lines(60) if WIKITEXT.exists() else [])
    bad = compare_encode(tok, ref.tokenize, texts, ALL_COMBOS)
    assert not bad, f"{len(bad)} mismatches:\n" + "\n".join(bad[:20])
    for text in texts:
        ids = tok.encode(text)
        for special in (True, False):
            for remove in (True, False):
                assert tok.decode_bytes(ids, special, remove) == ref.detokenize(ids, remove, special), text
