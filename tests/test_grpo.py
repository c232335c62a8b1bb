"""GRPO through the one loop on both backends: MLX and torch agree on the first steps when fed the same completions,
a resume (also inside a generation's μ steps) is bit-identical, the reference is the policy at init, the held-out
reward is logged, the reward and config checks name what is wrong, the planner sizes the sampling, and the CLI runs."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from forge_core.config import ForgeConfig
from forge_core.config_parse import set_value
from forge_core.errors import ForgeError
from forge_core.objectives.grpo import GRPOObjective
from forge_core.rundir import RunDir
from tests.conftest import write_jsonl
from tests.test_preference_methods import BACKENDS, HAVE, ops_of, records, train

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "sloe"]
REWARD_PY = '''
def ascii_share(prompts, completions, reference, **kw):
    """the share of the completion's characters that are ASCII, plus a bonus for the reference word's first letter"""
    return [sum(ord(ch) < 128 for ch in c) / max(len(c), 1) + 0.5 * (ref[0] in c)
            for c, ref in zip(completions, reference)]
'''


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"spell {w}", "reference": w} for w in WORDS])


@pytest.fixture
def reward_file(tmp_path):
    f = tmp_path / "rewards.py"
    f.write_text(REWARD_PY)
    return f


def config(tiny_model, data, out, reward_file, **sets) -> ForgeConfig:
    cfg = ForgeConfig()
    cfg.model.path, cfg.model.dtype = str(tiny_model), "float32"
    cfg.data.train, cfg.train.out_dir = str(data), str(out)
    base = {"quant.bits": 0, "lora.rank": 4, "lora.alpha": 4, "lora.init": "pissa", "train.steps": 4,
            "train.batch_size": 4, "train.warmup": 0, "train.lr": 2e-2, "train.log_every": 1, "train.eval_every": 0,
            "train.save_every": 100, "grpo.rewards": [f"{reward_file}:ascii_share", "builtin:length:6"],
            "grpo.reward_weights": [1.0, 0.5], "grpo.max_new_tokens": 6, "grpo.num_generations": 4}
    for key, value in {**base, **sets}.items():
        set_value(cfg, key, value)
    return cfg


PIECES = ["ap", "é!", "plum", "zz9", "ÿa", "ki", "ü", "date", "fé", "lo"]


def fed(self, prompts):
    """Completions as a fixed function of the prompt and its place in the batch (the same on both backends):
    mixes of ASCII and other characters, so the rewards differ within a group."""
    out = []
    for i, p in enumerate(prompts):
        text = "".join(PIECES[(i * 7 + len(p) + k * 3) % len(PIECES)] for k in range(1 + i % 3))
        out.append(self.hf.encode(text, add_special_tokens=False)[:self.cfg.grpo.max_new_tokens])
    return out


@pytest.mark.slow
@pytest.mark.skipif(not (HAVE["mlx"] and HAVE["cuda"]), reason="needs both backends")
@pytest.mark.parametrize("sets", [{}, {"grpo.beta": 0.1, "grpo.num_iterations": 2, "grpo.loss_type": "grpo",
                                       "grpo.temperature": 0.7},
                                  {"grpo.loss_type": "dr_grpo", "grpo.scale_rewards": "batch", "train.grad_accum": 2,
                                   "train.batch_size": 2}])
def test_mlx_and_torch_agree_when_fed_the_same_completions(tiny_model, prompts, reward_file, tmp_path, monkeypatch, sets):
    monkeypatch.setattr(GRPOObjective, "_sample", fed)
    out = {}
    for backend in ("mlx", "cuda"):
        cfg = config(tiny_model, prompts, tmp_path / backend, reward_file, **sets)
        out[backend] = records(train(cfg, "grpo", backend))
    for key in ("loss", "grad_norm", "reward", "kl", "clip_ratio/region_mean"):
        if key in out["mlx"][0]:
            np.testing.assert_allclose([r[key] for r in out["mlx"]], [r[key] for r in out["cuda"]], rtol=1e-4,
                                       atol=1e-4, err_msg=key)
    assert len({round(r["loss"], 6) for r in out["mlx"]}) > 1  # the steps moved the policy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mu", [1, 2])
def test_resume_is_bit_identical(tiny_model, prompts, reward_file, tmp_path, backend, mu):
    """Sampling included: the RNG follows the step, and a generation serving μ = 2 steps is read back."""
    sets = {"grpo.num_iterations": mu, "grpo.beta": 0.05 if mu == 2 else 0.0, "grpo.temperature": 1.3}
    straight = train(config(tiny_model, prompts, tmp_path / "straight", reward_file, **sets), "grpo", backend)
    cfg = config(tiny_model, prompts, tmp_path / "resumed", reward_file, **sets)
    train(cfg, "grpo", backend, stop_at=3)  # inside the second generation when μ = 2
    resumed = train(cfg, "grpo", backend, resume=str(tmp_path / "resumed"))
    a, b = records(straight), records(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "reward", "completions/mean_length"):
            assert y[key] == x[key], (key, x["step"])
    wa = load_file(str(next((straight / "adapter").glob("*.safetensors"))))
    wb = load_file(str(next((resumed / "adapter").glob("*.safetensors"))))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert any(r["grad_norm"] > 0 for r in a)  # the run did learn something to compare


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_reference_is_the_policy_at_init(tiny_model, prompts, reward_file, tmp_path, backend, monkeypatch):
    """β > 0: the first step's KL is 0 (the policy is its own reference); later the policy moves away from it, and
    swapping the reference in leaves the trained weights as they were."""
    monkeypatch.setattr(GRPOObjective, "_sample", fed)
    seen = []
    real = GRPOObjective._reference_logps

    def spy(self, b):
        before = self.ops.adapter_state(self.model)
        out = real(self, b)
        after = self.ops.adapter_state(self.model)
        seen.append(all(np.array_equal(before[k], after[k]) for k in before))
        return out

    monkeypatch.setattr(GRPOObjective, "_reference_logps", spy)
    cfg = config(tiny_model, prompts, tmp_path / "run", reward_file, **{"grpo.beta": 0.5, "train.steps": 3})
    recs = records(train(cfg, "grpo", backend))
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert recs[-1]["kl"] > 1e-6
    assert seen and all(seen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_held_out_reward_and_metrics_are_logged(tiny_model, prompts, reward_file, tmp_path, backend):
    cfg = config(tiny_model, prompts, tmp_path / "run", reward_file, **{"train.steps": 2, "train.eval_every": 2})
    cfg.data.valid = str(prompts)
    run = train(cfg, "grpo", backend)
    valid = records(run, "valid")
    assert len(valid) == 1 and 0.0 <= valid[0]["rewards/ascii_share/mean"] <= 1.0
    assert set(valid[0]) >= {"reward", "completions/mean_length", "rewards/length/mean"}
    rec = records(run)[0]
    for key in ("reward", "reward_std", "rewards/ascii_share/mean", "completions/mean_length", "completions/clipped_ratio",
                "sampling_tok_s", "time/sampling_s", "tok_s"):
        assert np.isfinite(rec[key]), key
    assert 0 < rec["completions/mean_length"] <= 6
    meta = json.loads((run / "adapter" / "forge.json").read_text())
    assert meta["kind"] == "grpo"
    assert (run / "loss.png").is_file()


def test_generation_batches_are_whole_groups(tiny_model, prompts, reward_file, tmp_path):
    from forge_core.objectives.grpo import check_grpo_config

    cfg = config(tiny_model, prompts, tmp_path / "run", reward_file, **{"train.batch_size": 3})
    with pytest.raises(ForgeError, match="whole groups of grpo.num_generations 4"):
        check_grpo_config(cfg)
    with pytest.raises(ForgeError, match=r"grpo.num_generations': 1 is out of range \(allowed: >= 2\)"):
        set_value(cfg, "grpo.num_generations", 1)  # GRPO compares completions of one prompt: 2 at least


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_reward_names_the_function_and_row(tiny_model, prompts, tmp_path, backend):
    bad = tmp_path / "bad.py"
    bad.write_text("def score(prompts, completions, reference, **kw):\n"
                   "    return [1.0 / (r != 'fig') for r in reference]\n")
    cfg = config(tiny_model, prompts, tmp_path / "run", bad, **{"grpo.rewards": [f"{bad}:score"],
                                                                "grpo.reward_weights": [], "data.shuffle": False,
                                                                "train.batch_size": 8})
    with pytest.raises(ForgeError, match=r"reward .*bad.py:score raised ZeroDivisionError.*prompts.jsonl:4"):
        train(cfg, "grpo", backend)


def test_mask_truncated_completions_drops_their_loss(tiny_model, prompts, reward_file, tmp_path, monkeypatch):
    """A completion as long as max_new_tokens was cut (it did not stop): with mask_truncated_completions it carries
    no loss, and a completion that stopped keeps its tokens and its end-of-turn token."""
    pytest.importorskip("torch")
    from rich.console import Console

    from forge_core.distributed import World
    from forge_core.objectives import build
    from forge_core.train import _build_model

    given = []
    monkeypatch.setattr(GRPOObjective, "_sample", lambda self, ps: given.extend(c[:3] for c in fed(self, ps)) or given)
    cfg = config(tiny_model, prompts, tmp_path / "run", reward_file,
                 **{"grpo.max_new_tokens": 3, "grpo.mask_truncated_completions": True})
    ops, run, console = ops_of("cuda"), RunDir(cfg.train.out_dir), Console(quiet=True)
    model, tok, _, _ = _build_model(cfg, "grpo", ops, run, console, World())
    obj = build("grpo", cfg, ops, model, tok, run, console)
    obj.prepare_step(1)
    kept = obj._pending[0]["mask"].sum(-1)
    cut = np.array([len(c) == 3 for c in given])
    assert cut.any() and not cut.all()
    assert np.all(kept[cut] == 0)
    assert np.array_equal(kept[~cut], [len(c) + 1 for c, x in zip(given, cut) if not x])


def test_planner_sizes_the_sampling(tiny_model, prompts, reward_file, tmp_path):
    from forge_core.memory.plan import data_shape_of, plan_memory
    from forge_core.models.known import load_model_config

    model_config, _ = load_model_config(str(tiny_model))
    short = config(tiny_model, prompts, tmp_path / "a", reward_file)
    long = config(tiny_model, prompts, tmp_path / "b", reward_file, **{"grpo.max_new_tokens": 300})
    plans = [plan_memory(c, model_config, kind="grpo", backend="mlx", data=data_shape_of(c, "grpo")) for c in (short, long)]
    kv = [next(c for c in p.components if c.name == "sampling KV cache") for p in plans]
    assert kv[1].bytes > kv[0].bytes and plans[1].total_bytes > plans[0].total_bytes
    shape = data_shape_of(short, "grpo")
    assert shape.head_per_row == 7 and shape.rows == len(WORDS)


@pytest.mark.skipif(not HAVE["cuda"], reason="torch not installed")
def test_cli_grpo_end_to_end(tiny_model, prompts, reward_file, tmp_path):
    from forge_core.cli import cli

    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["grpo", "--backend", "cuda", "--model", str(tiny_model), "--data", str(prompts),
                                   "--out", str(out), "--steps", "2", "--batch-size", "4", "--quant", "none",
                                   "--reward", f"{reward_file}:ascii_share", "--reward", "builtin:length:6",
                                   "--reward-weight", "1", "--reward-weight", "0.5", "--num-generations", "4",
                                   "--max-new-tokens", "6", "--set", "model.dtype=float32"])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["grpo"]["rewards"] == [f"{reward_file}:ascii_share", "builtin:length:6"]
    assert saved["grpo"]["reward_weights"] == [1.0, 0.5]
    assert (out / "adapter" / "forge.json").is_file()
    res = CliRunner().invoke(cli, ["grpo", "--backend", "cuda", "--model", str(tiny_model), "--data", str(prompts),
                                   "--out", str(tmp_path / "bad"), "--reward", "builtin:nope"])
    assert res.exit_code == 2 and "no built-in 'nope'" in res.output


def test_sft_rows_serve_as_prompts_with_their_answer_as_reference(tiny_model, tmp_path):
    """`forge grpo --data sft.jsonl`: each conversation up to its last answer is the prompt, that answer the
    `reference` column; forge eval reads prompt-only rows as (prompt, reference) and scores no held-out loss."""
    from forge_core import data as fdata
    from forge_core.config import DataConfig
    from forge_core.data.eval_rows import prompt_only, prompts_and_references
    from forge_core.data.tokenize import load_tokenizer

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "spell fig"},
                                                             {"role": "assistant", "content": "f i g"}]}])
    grpo = write_jsonl(tmp_path / "grpo.jsonl", [{"prompt": "spell fig", "reference": "f i g"}])
    tok = load_tokenizer(tiny_model)
    a, _ = fdata.load_prompts(sft, tok, DataConfig(), 64, 8)
    b, _ = fdata.load_prompts(grpo, tok, DataConfig(), 64, 8)
    assert np.array_equal(a[0].prompt, b[0].prompt) and a[0].columns == b[0].columns == {"reference": "f i g"}
    assert b[0].where.endswith("grpo.jsonl:1")
    assert prompt_only(grpo, DataConfig()) and not prompt_only(sft, DataConfig())
    assert prompts_and_references(grpo, DataConfig()) == [([{"role": "user", "content": "spell fig"}], "f i g")]
    long, stats = fdata.load_prompts(grpo, tok, DataConfig(), 12, 8)  # room for 4 prompt tokens: cut from the left
    assert len(long[0].prompt) == 4 and stats.truncated == 1 and np.array_equal(long[0].prompt, b[0].prompt[-4:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_are_of_the_distribution_sampled_from(tiny_model, tmp_path, backend):
    """TRL scores π, π_old and π_ref at the sampling temperature: log_softmax(logits / T) at the completion tokens."""
    from forge_core import data as fdata

    ops = ops_of(backend)
    cfg = ForgeConfig()
    cfg.model.path, cfg.model.dtype = str(tiny_model), "float32"
    set_value(cfg, "quant.bits", 0)
    model, _, _, _ = ops.build_model(cfg)
    b = fdata.collate_completions([(np.array([5, 6, 7], np.int32), np.array([40, 41, 42, 2], np.int32))], 0)
    b = fdata.add_loss_positions(b, 4)
    b["temperature"] = np.array([0.6], np.float32)
    got = ops.to_numpy(ops.per_token_logps(model, ops.to_batch(model, b)))
    full = {k: v for k, v in b.items() if k not in ("loss_positions", "loss_weights", "temperature")}
    if backend == "mlx":
        import mlx.core as mx

        logits = np.array(model(mx.array(full["inputs"])).astype(mx.float32))
    else:
        import torch

        with torch.no_grad():
            logits = model(input_ids=torch.tensor(full["inputs"]).long()).logits.float().numpy()
    z = logits / 0.6
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, full["targets"][..., None].astype(np.int64), -1)[..., 0] * full["mask"]
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.count_nonzero(got) == 4  # the completion and its end token, nothing of the prompt


def test_every_completion_cut_is_a_zero_loss_not_nan(tiny_model, prompts, reward_file, tmp_path, monkeypatch):
    """mask_truncated_completions with every completion at max_new_tokens: no token carries loss; TRL clamps the
    token count to 1, so the step is a zero loss and a zero gradient."""
    pytest.importorskip("torch")
    monkeypatch.setattr(GRPOObjective, "_sample",
                        lambda self, ps: [self.hf.encode("ap" * 8, add_special_tokens=False)[:3] for _ in ps])
    cfg = config(tiny_model, prompts, tmp_path / "run", reward_file,
                 **{"grpo.max_new_tokens": 3, "grpo.mask_truncated_completions": True, "train.steps": 2})
    recs = records(train(cfg, "grpo", "cuda"))
    assert [r["loss"] for r in recs] == [0.0, 0.0] and all(r["completions/clipped_ratio"] == 1.0 for r in recs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_a_checkpoint_inside_an_earlier_generation(tiny_model, prompts, reward_file, tmp_path, backend):
    """save_every 3 with μ = 2: the checkpoint at step 3 is inside the second generation, and the run goes on past
    it (a third generation) before it is killed; the checkpoint holds its own generation, so the resume is exact."""
    import json as _json
    import shutil

    sets = {"grpo.num_iterations": 2, "train.steps": 6, "train.save_every": 3}
    straight = train(config(tiny_model, prompts, tmp_path / "straight", reward_file, **sets), "grpo", backend)
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    shutil.rmtree(cut / "adapter")
    shutil.rmtree(cut / "checkpoints" / "step_000006")
    (cut / "latest.json").write_text(_json.dumps({"step": 3, "dir": "checkpoints/step_000003"}))
    assert (cut / "checkpoints" / "step_000003" / "objective.safetensors").is_file()
    resumed = train(config(tiny_model, prompts, cut, reward_file, **sets), "grpo", backend, resume=str(cut))
    assert [r["loss"] for r in records(resumed)] == [r["loss"] for r in records(straight)]


def test_reward_names_stay_apart():
    from forge_core.objectives.grpo import reward_names

    assert reward_names(["builtin:regex:a", "builtin:regex:b", "r.py:score", "builtin:regex:c"]) == \
        ["regex", "regex_2", "score", "regex_3"]


def test_too_few_prompts_for_one_generation_is_named(tiny_model, reward_file, tmp_path):
    data = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "spell fig", "reference": "fig"}])
    cfg = config(tiny_model, data, tmp_path / "run", reward_file, **{"train.batch_size": 8})
    with pytest.raises(ForgeError, match="1 prompts cannot fill one generation of 2"):
        train(cfg, "grpo", "cuda" if HAVE["cuda"] else "mlx")
