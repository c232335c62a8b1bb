"""One architecture table (forge_core/models/architectures.py) read by both backends' heads and the planner: what
the planner plans for the vocabulary head is what the backend builds, for a head that splits (phi3) and one that
does not (gemma2, soft-capped)."""

import json
import shutil

import pytest

from forge_core.config import ForgeConfig
from forge_core.memory.estimate import ModelShape, make_run
from forge_core.models.architectures import architecture
from tests.test_preference_methods import BACKENDS

torch = pytest.importorskip("torch")


def _model(kind: str, tiny_model, out):
    """A tiny random phi3 or gemma2 written by transformers, with the tiny byte tokenizer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Phi3Config, Phi3ForCausalLM

    base = json.loads((tiny_model / "config.json").read_text())
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": base["vocab_size"], "max_position_embeddings": 128, "eos_token_id": base["eos_token_id"],
             "pad_token_id": base["pad_token_id"], "bos_token_id": None}
    if kind == "phi3":
        config, cls = Phi3Config(**shape, num_key_value_heads=4, original_max_position_embeddings=128,
                                 tie_word_embeddings=False), Phi3ForCausalLM
    else:
        config, cls = Gemma2Config(**shape, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16), \
            Gemma2ForCausalLM
    torch.manual_seed(0)
    cls(config).float().save_pretrained(str(out), safe_serialization=True)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def _backend_head(backend: str, model) -> bool:
    """Whether the backend's loss runs the head at the loss positions, chunked."""
    if backend == "mlx":
        from forge_mlx import head

        return head.splittable(model) and head.dense_head_weight(model) is not None
    from forge_cuda import head

    return head.head_weight(model) is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,splits", [("phi3", True), ("gemma2", False)])
def test_the_plans_head_is_the_head_the_backend_builds(kind, splits, backend, tiny_model, tmp_path):
    from forge_core.backend import ops as backend_ops

    model_dir = _model(kind, tiny_model, tmp_path / kind)
    cfg = ForgeConfig()
    cfg.model.path, cfg.lora.rank, cfg.quant.group_size = str(model_dir), 4, 32
    model, *_ = backend_ops(backend).build_model(cfg)
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    run = make_run(cfg, shape, "sft", backend, False)
    assert architecture(kind).split_head == splits
    assert _backend_head(backend, model) == run.const["head_chunked"] == splits
    assert run.const["head_at_loss_positions"] == splits
    cfg.train.chunked_loss = False  # whole logits on both sides (MLX still gathers the loss positions first)
    run = make_run(cfg, shape, "sft", backend, False)
    assert not run.const["head_chunked"] and run.const["head_at_loss_positions"] == (splits and backend == "mlx")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_split_phi3_head_gives_the_whole_logits_loss(backend, tiny_model, tmp_path):
    """phi3 joins the split heads on MLX too: the loss at the loss positions, chunked, equals the whole logits'."""
    import numpy as np

    from forge_core.backend import ops as backend_ops
    from forge_core.data.batches import add_loss_positions

    ops = backend_ops(backend)
    cfg = ForgeConfig()
    cfg.model.path, cfg.lora.rank, cfg.quant.group_size = str(_model("phi3", tiny_model, tmp_path / "p")), 4, 32
    model, *_ = ops.build_model(cfg)
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 250, (2, 12))
    mask = (np.arange(12)[None, :] >= 6).astype(np.float32).repeat(2, 0)
    batch = add_loss_positions({"inputs": inputs, "targets": np.roll(inputs, -1, 1), "mask": mask})
    losses = []
    for chunked in (True, False):
        model.forge_chunked_loss = chunked
        loss, count = ops.sft_loss(model, ops.to_batch(model, dict(batch)))[:2]
        losses.append(float(ops.to_numpy(loss)) / float(ops.to_numpy(count)))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
