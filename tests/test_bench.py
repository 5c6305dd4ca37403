"""`pyquant bench`: the cuda device in numba's CUDA simulator on a tiny random model (a row with positive
tok/s, the torch fp16 peer's one-line reason when it cannot run, the documented JSON, the PNG), bad --device
input, and the decode roofline's bytes per token against a hand count over the GGUF tensor list."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_kernels_cuda import tiny_gguf

from pyquant.bench import weight_bytes_per_token
from pyquant.gguf.writer import TensorSpec, write_gguf
from pyquant.quants import quantize


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("bench") / "tiny.gguf", "qwen2")


@pytest.mark.cuda
def test_bench_cuda_device_in_simulator(tiny, cli, tmp_path):
    """One token of pp and of tg (the simulator runs each CUDA thread in Python: ~5 s a forward pass)."""
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    tiny_run = ("--device", "cuda", "-p", "1", "-n", "1", "-r", "1")
    proc = cli("bench", "-m", str(tiny), *tiny_run, "--json", str(out), "--plot", str(png), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| cuda | pyquant |"))
    pp, tg = (float(c) for c in row.split("|")[4:6])
    assert pp > 0 and tg > 0, row

    res = json.loads(out.read_text())
    documented = {"model", "file_bytes", "n_prompt", "n_gen", "reps", "backend", "cache_type", "devices"}
    assert documented | {"weight_bytes_per_token", "runs", "cuda"} <= set(res)
    assert res["devices"] == ["cuda"] and res["runs"] == []
    ours, peer = res["cuda"]["pyquant"], res["cuda"]["torch fp16"]
    side = {"pp", "tg", "pp_runs", "tg_runs", "ttft_s", "rss_bytes"}
    assert side | {"bandwidth_bytes_s", "bandwidth_by"} <= set(ours)
    assert ours["pp"] > 0 and ours["tg"] > 0 and ours["bandwidth_bytes_s"] > 0
    roofline = res["weight_bytes_per_token"] * ours["tg"] / ours["bandwidth_bytes_s"]
    assert res["cuda"]["roofline"] == pytest.approx(roofline)
    if "unavailable" in peer:  # CI: torch without CUDA; the reason is one line in the table too
        assert peer["unavailable"] and "\n" not in peer["unavailable"]
        assert f"unavailable: {peer['unavailable']}" in proc.stdout
        assert "Traceback" not in proc.stderr
    else:
        assert peer["pp"] > 0 and peer["tg"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.png"]  # no temp files left


def test_bench_cpu_llama_peer_that_cannot_run_is_one_row(tiny, cli, tmp_path):
    """llama.cpp refuses the tiny model (a vocabulary without merges), or is not installed: either way one
    line in its row, and pyquant's row (the numpy backend: no kernels to compile) still comes."""
    out = tmp_path / "cpu.json"
    tiny_run = ("--device", "cpu", "--backend", "numpy", "-t", "1", "-p", "2", "-n", "2", "-r", "1")
    proc = cli("bench", "-m", str(tiny), *tiny_run, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads(out.read_text())["runs"][0]
    assert run["threads"] == 1 and run["pyquant"]["pp"] > 0 and run["pyquant"]["tg"] > 0
    why = run["llama.cpp"]["unavailable"]
    assert why and "\n" not in why
    assert f"| cpu | llama.cpp | 1 | - | - | unavailable: {why} | - |" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("device", ["tpu", "cpu,gpu", ","])
def test_bench_unknown_device_is_a_one_line_error(tiny, cli, device):
    proc = cli("bench", "-m", str(tiny), "--device", device)
    assert proc.returncode == 2
    assert proc.stderr.startswith("pyquant: error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert "--device" in proc.stderr and repr(device) in proc.stderr


def test_weight_bytes_per_token_by_hand(tiny, tmp_path, oracle):
    """Tied (tiny: no output.weight, the logits read token_embd) against gguf-py's tensor list; untied
    against bytes counted by hand: q8_0 is 34 bytes per 32 values, q4_0 18, f32 4 per value."""
    tensors = oracle(tiny).tensors
    want = sum(int(t.n_bytes) for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    want += next(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")
    assert "output.weight" not in {t.name for t in tensors}
    assert weight_bytes_per_token(tiny) == want

    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": ((100, 64), "q8_0"),  # one row read per token: not counted
        "output.weight": ((100, 64), "q4_0"),  # 100 rows x 2 blocks x 18 bytes
        "blk.0.attn_norm.weight": ((64,), "f32"),  # a vector: not a matrix
        "blk.0.ffn_up.weight": ((96, 64), "q8_0"),  # 96 x 2 x 34
        "blk.1.attn_q.weight": ((64, 64), "f32"),  # 64 x 64 x 4
    }
    def data(shape, type):
        x = rng.standard_normal(shape).astype(np.float32)
        return x if type == "f32" else quantize(x, type)

    specs = [TensorSpec(n, t, shape, lambda s=shape, t=t: data(s, t)) for n, (shape, t) in shapes.items()]
    path = write_gguf(tmp_path / "untied.gguf", {"general.architecture": "llama"}, specs)
    assert weight_bytes_per_token(path) == 100 * 2 * 18 + 96 * 2 * 34 + 64 * 64 * 4


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is there: --device cuda would run")
def test_bench_cuda_without_a_device_is_a_one_line_error(tiny, cli, monkeypatch):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)  # the real numba.cuda, which finds no GPU here
    proc = cli("bench", "-m", str(tiny), "--device", "cuda", "-p", "1", "-n", "1", "-r", "1")
    assert proc.returncode == 2
    assert proc.stderr == "pyquant: error: --device cuda: numba sees no CUDA device\n", proc.stderr
