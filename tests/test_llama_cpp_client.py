"""llama.cpp itself as the client of forge's GGUF files: its prebuilt Node binding (node-llama-cpp, CPU build, from
the npm registry: `make llama-cpp`) decodes greedily from each file, and its tokens are compared with transformers'.

- A tiny trained run exported as f32 / f16 / q8_0 / q5_1 / q4_0: llama.cpp's greedy tokens equal transformers' on
  the merged float model (f32, f16) and on the same file dequantized by transformers' GGUF loader (the block types:
  llama.cpp then runs the very weights transformers runs; it rounds the activations to 8 bits inside its quantized
  matmuls, so a long answer may part where two logits are within that rounding - the test reads 8 tokens).
- Mixtures of experts (Mixtral, Qwen3-MoE: the router as ffn_gate_inp, the experts stacked in ffn_*_exps): llama.cpp's
  tokens equal transformers' on the source checkpoint.
- Rope from both config styles (a top-level rope_theta, transformers 5's rope_parameters; base 1e5, linear scaling)
  and Gemma 3 (6 blocks, a global base 1e6 and a sliding 1e4): llama.cpp's tokens equal transformers' on the source
  checkpoint.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from forge_core.cli import cli
from forge_core.models import gguf_export
from tests.rope_fixtures import gemma3, rope_llama

CLIENT = Path(__file__).resolve().parents[1] / "tools" / "llama_cpp"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("node") is None or not (CLIENT / "node_modules" / "node-llama-cpp").is_dir(),
    reason="needs node and tools/llama_cpp/node_modules (make llama-cpp)")]

PROMPTS = [[5, 70, 71, 72, 100, 3, 9], [200, 41, 42, 43]]
END_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>")
N = 8


def llama_cpp_greedy(gguf: Path, prompts=PROMPTS, n: int = N) -> list[list[int]]:
    spec = json.dumps({"model": str(gguf), "prompts": prompts, "max_tokens": n})
    out = subprocess.run(["node", str(CLIENT / "greedy.mjs"), spec], capture_output=True, text=True, timeout=600,
                         cwd=CLIENT, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens"]


def transformers_greedy(model_dir: Path, prompts=PROMPTS, n: int = N, **kw) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kw).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    vocab = json.loads((Path(model_dir) / "tokenizer.json").read_text())["model"]["vocab"] if \
        (Path(model_dir) / "tokenizer.json").is_file() else {}
    eos |= {vocab[t] for t in END_TEXTS if t in vocab}  # llama.cpp ends at these too (its end-of-generation set)
    out = []
    for p in prompts:  # the answer: up to its end token, which llama.cpp does not hand out
        ids = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):].tolist()
        out.append(ids[:next((k for k, t in enumerate(ids) if t in eos), len(ids))])  # the answer, as llama.cpp's
    return out


def with_a_merge(tiny_model: Path, out: Path) -> Path:
    """The tiny Llama with one BPE merge in its byte tokenizer: llama.cpp refuses a BPE vocabulary without merges
    (real ones always have them; GGUF cannot hold an empty list). Token 255 (a rare byte) becomes "ab"; prompts here
    are token ids, so nothing else changes."""
    shutil.copytree(tiny_model, out)
    tok = json.loads((out / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    old = next(t for t, i in vocab.items() if i == 255)
    vocab["ab"] = vocab.pop(old)
    tok["model"]["merges"] = [["a", "b"]]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


@pytest.fixture(scope="module")
def merged_tok(tiny_model, tmp_path_factory):
    return with_a_merge(tiny_model, tmp_path_factory.mktemp("tok") / "model")


@pytest.fixture(scope="module")
def run(merged_tok, tmp_path_factory):
    import io

    from rich.console import Console

    from forge_core.config import ForgeConfig
    from forge_mlx import ops
    from tests.bound import bind

    tmp = tmp_path_factory.mktemp("llama_cpp")
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "blue sky"}]}
            for i in range(8)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train, cfg.train.out_dir = str(merged_tok), str(tmp / "train.jsonl"), str(tmp / "run")
    cfg.lora.rank, cfg.lora.alpha, cfg.quant.group_size = 4, 4.0, 32
    cfg.train.steps, cfg.train.lr, cfg.train.batch_size = 3, 2e-2, 4
    return bind(ops)[0](cfg, console=Console(file=io.StringIO())), tmp


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q5_1", "q4_0"])
def test_llama_cpp_decodes_each_gguf_type_as_transformers_does(run, outtype):
    src, tmp = run
    runner = CliRunner()
    if not (tmp / "merged").exists():
        res = runner.invoke(cli, ["export", str(src), "--format", "merged", "--out", str(tmp / "merged")])
        assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["export", str(src), "--format", "gguf", "--outtype", outtype, "--out", str(tmp / outtype)])
    assert res.exit_code == 0, res.output
    gguf = tmp / outtype / f"model-{outtype}.gguf"
    got = llama_cpp_greedy(gguf)
    want = transformers_greedy(tmp / "merged") if outtype in ("f32", "f16") else \
        transformers_greedy(tmp / outtype, gguf_file=gguf.name)
    print(f"{outtype}: llama.cpp {got} / transformers {want}")
    if outtype in ("f32", "f16", "q8_0"):
        assert got == want
    else:  # 4/5-bit blocks: llama.cpp's 8-bit activations may tip a near tie late in an answer
        assert all(g[:4] == w[:4] for g, w in zip(got, want)) and sum(g == w for g, w in zip(got, want)) >= 1


# each style once, the scaling on the transformers-5 style (the four combinations' metadata: test_gguf_export.py)
@pytest.mark.parametrize("style,scaled", [("rope_parameters", True), ("top-level", False)])
def test_llama_cpp_reads_the_rope_of_either_config_style(style, scaled, merged_tok, tmp_path):
    src = rope_llama(merged_tok, tmp_path / "src", style, scaled)
    gguf_export.write_gguf(src, tmp_path / "m.gguf", "f32")
    long = [list(range(3, 40))]  # positions far enough apart for the base and the scaling to matter
    assert llama_cpp_greedy(tmp_path / "m.gguf", long) == transformers_greedy(src, long)


def test_llama_cpp_runs_gemma3_with_its_two_rope_bases(merged_tok, tmp_path):
    src = gemma3(merged_tok, tmp_path / "src")
    gguf_export.write_gguf(src, tmp_path / "m.gguf", "f32")
    long = [list(range(3, 30))]  # past the sliding window of 8
    assert llama_cpp_greedy(tmp_path / "m.gguf", long) == transformers_greedy(src, long)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_llama_cpp_runs_a_mixture_of_experts_as_transformers_does(kind, tmp_path):
    from tests.moe import make_tiny_moe

    src = with_a_merge(make_tiny_moe(tmp_path / "moe", kind), tmp_path / "src")
    gguf_export.write_gguf(src, tmp_path / "m.gguf", "f32")
    long = [list(range(3, 24))]
    got = llama_cpp_greedy(tmp_path / "m.gguf", long)
    assert got == transformers_greedy(src, long) and len(got[0]) == N  # a whole answer, no early end
