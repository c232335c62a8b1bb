"""GRPO on prompt-only rows: sample G completions per prompt with the policy, score them with reward functions,
and push the policy toward the completions that beat their group. The formulas are TRL 1.16's
(forge_core/losses/grpo.py); this file is when and on what they run.

A step, with μ = grpo.num_iterations (prepare_step, before any gradient):
  - every μ-th step, a generation. This rank's prompts of the step (batch_size x grad_accum / G of them), each
    G times, are decoded by the backend's batched generator (temperature, top_p, max_new_tokens). A completion
    that stopped gets its end-of-turn token back, so the policy also learns where to stop. Rewards are summed
    with their weights and turned into advantages over the global batch (every rank's rewards, one exchange).
    With β > 0 the reference log-probs come from the policy at init: step 0's adapter weights are swapped in
    for one no-grad pass and the current ones put back (never a second model). With μ > 1 the sampling
    policy's log-probs are kept as π_old.
  - the step trains on the generation's micro-batches, in order. With μ = 1, π_old is the policy's own
    log-probs as constants (ratio 1: TRL's shortcut, no extra pass).
Under a launcher each rank samples its own prompts; every local part of a generation (sampling, rewards, the
no-grad passes) runs before the one exchange, which also carries a failure flag, so a rank that fails (out of
memory, a reward that raises) never leaves the others waiting in a collective.
Exact resume: the loop reseeds the RNG per step, so a step's sampling is a function of the weights. A
generation that serves μ > 1 steps is gathered to rank 0 and a checkpoint inside its steps holds it
(objective.safetensors), so a resume there trains on the same completions.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from functools import partial

import numpy as np

from forge_core import data as fdata
from forge_core.datagen.rewards import Rewards
from forge_core.distributed import World
from forge_core.errors import ForgeError
from forge_core.eval import generation
from forge_core.losses.grpo import METRICS, group_advantages, grpo_reduce, grpo_terms
from forge_core.objectives.base import Objective, exchange, load_split

SCORED = ("inputs", "targets", "mask", "loss_positions", "loss_weights", "temperature")  # what a log-prob pass reads


def grpo_loss(ops, model, batch, *, on_policy: bool, epsilon_low: float, epsilon_high: float, beta: float,
              delta: float | None, level: str, loss_type: str, max_new_tokens: int):
    """(loss sum, count, metric sums) of one micro-batch of completions: batch holds inputs/targets/mask of
    prompt + completion, advantages (B,), old_logps (B, T) unless on_policy, ref_logps (B, T) when beta > 0."""
    logps = ops.per_token_logps(model, batch)
    old = ops.stop_gradient(logps) if on_policy else batch["old_logps"]
    ref = batch["ref_logps"] if beta else logps
    mask = batch["mask"]
    per_token, sums = grpo_terms(ops.xp, logps, old, ref, batch["advantages"], mask, epsilon_low=epsilon_low,
                                 epsilon_high=epsilon_high, beta=beta, delta=delta, level=level)
    total, count = grpo_reduce(ops.xp, per_token, mask, loss_type, max_new_tokens)
    return total, count, {**sums, "tokens": mask.sum()}


def reward_names(specs: list[str]) -> list[str]:
    """The metric name of each reward: builtin:json_fields:ref -> json_fields, rewards.py:format_ok -> format_ok;
    a name that repeats gets _2, _3 (two builtin:regex rewards are regex and regex_2)."""
    out = []
    for spec in specs:
        name = spec.split(":")[1] if spec.startswith("builtin:") else spec.rpartition(":")[2]
        k, unique = 1, name
        while unique in out:
            k += 1
            unique = f"{name}_{k}"
        out.append(unique)
    return out


def check_launch(cfg) -> None:
    """At launch, before the model is built: the batch holds whole groups, and every reward loads."""
    check_grpo_config(cfg)
    Rewards.from_specs(cfg.grpo.rewards, cfg.grpo.reward_weights)


def check_grpo_config(cfg) -> None:
    g, t = cfg.grpo, cfg.train
    per_rank = t.batch_size * t.grad_accum
    if per_rank % g.num_generations:
        raise ForgeError(f"a step's completions per rank (train.batch_size {t.batch_size} x train.grad_accum "
                         f"{t.grad_accum} = {per_rank}) must be whole groups of grpo.num_generations "
                         f"{g.num_generations}; make batch_size x grad_accum a multiple of it")
    if g.num_iterations < 1 or g.max_new_tokens < 1:
        raise ForgeError("grpo.num_iterations and grpo.max_new_tokens must be at least 1")
    if g.temperature <= 0:
        raise ForgeError(f"grpo.temperature is {g.temperature}: GRPO needs different completions of a prompt, so "
                         "sample (temperature > 0; TRL's default is 1.0)")
    if not 0 < g.top_p <= 1:
        raise ForgeError(f"grpo.top_p must be in (0, 1], got {g.top_p}")


class GRPOObjective(Objective):
    kind = "grpo"

    def __init__(self, kind, cfg, ops, model, tokenizer, run, console, world: World):
        g = cfg.grpo
        check_grpo_config(cfg)
        self.run, self.tokenizer = run, tokenizer
        self.rewards = Rewards.from_specs(g.rewards, g.reward_weights)
        self.names = reward_names(g.rewards)
        hf = ops.hf_tokenizer(tokenizer)
        if hf.eos_token_id is None:
            raise ForgeError("GRPO needs the tokenizer's end-of-turn (eos) token to end completions; this tokenizer has none")
        self.eos, self.hf = int(hf.eos_token_id), hf
        rows, valid = load_split(_prompt_loader(g.max_new_tokens), cfg, hf, console)
        self.G, self.mu = g.num_generations, g.num_iterations
        per_rank = cfg.train.batch_size * cfg.train.grad_accum // self.G  # prompts per rank per generation
        if len(rows) < per_rank * world.size:
            raise ForgeError(f"{cfg.data.train}: {len(rows)} prompts cannot fill one generation of "
                             f"{per_rank * world.size} (train.batch_size x grad_accum / grpo.num_generations"
                             f"{' x ranks' if world.size > 1 else ''}); add prompts or lower train.batch_size")
        # the data order draws prompts, one generation's at a time; an epoch (train.epochs) trains each prompt G
        # times, each generation for μ steps; a row's loss positions are a completion and its end-of-turn token
        super().__init__(cfg, ops, model, tokenizer, rows, valid, world, per_rank=per_rank,
                         cap=g.max_new_tokens + 1, n_rows=len(rows) * self.G * self.mu)
        self.iteration, self.generations, self._buffer, self._pending, self._gen_metrics = 0, 0, [], [], {}
        self._arrays: dict = {}  # μ > 1: the generation in use, every rank's, for a checkpoint inside its steps
        self.init_adapter = ops.adapter_state(model) if g.beta else None  # the reference: the policy at init
        self.loss_fn = partial(grpo_loss, ops, on_policy=self.mu == 1, epsilon_low=g.epsilon,
                               epsilon_high=g.epsilon_high or g.epsilon, beta=g.beta, delta=g.delta or None,
                               level=g.importance_sampling_level, loss_type=g.loss_type,
                               max_new_tokens=g.max_new_tokens)
        self._logps = ops.no_grad(model, partial(ops.per_token_logps, model))
        self._dense: dict = {}  # the dequantized base the CPU samples from (ops.sampling_weights)

    # ------------------------------------------------------------------ data position (exact resume)

    def state(self) -> dict:
        return {**self.order.state(), "grpo_iteration": self.iteration, "grpo_generations": self.generations,
                "grpo_metrics": dict(self._gen_metrics)}

    def checkpoint_arrays(self, state: dict) -> dict:
        """Inside a generation's μ steps a checkpoint must hold its completions (every rank's)."""
        return self._arrays if state.get("grpo_iteration") else {}

    def restore(self, state: dict | None, arrays: dict | None = None) -> None:
        if not state:
            return
        size = self.per_rank * self.world.size
        if state.get("batch_size", size) != size:
            raise ForgeError(f"resume: this run sampled for {state['batch_size']} prompts per step, now it would be "
                             f"{size}; resume with the same train.batch_size, grad_accum and number of ranks")
        super().restore(state)
        self.iteration, self.generations = state.get("grpo_iteration", 0), state.get("grpo_generations", 0)
        self._gen_metrics = dict(state.get("grpo_metrics", {}))
        if self.iteration:  # inside a generation's μ steps: train on the same completions
            if not arrays:
                raise ForgeError(f"resume: the checkpoint is inside generation {self.generations} (grpo.num_iterations "
                                 f"{self.mu}) but holds no objective.safetensors with its completions")
            self._arrays = arrays
            self._buffer = _ungathered(self.world, arrays)

    # ------------------------------------------------------------------ a step

    def prepare_step(self, micro_batches: int) -> None:
        if self.iteration == 0:
            self._buffer, self._gen_metrics = self._generate(micro_batches)
            self.generations += 1
            if self.mu > 1:  # every rank's micro-batches, gathered (a collective: every rank, every generation)
                self._arrays = _gathered(self.world, {f"{m}/{name}": a for m, b in enumerate(self._buffer)
                                                      for name, a in b.items()})
        else:  # the generation's completions again: this step spent no time sampling
            self._gen_metrics.update({"time/sampling_s": 0.0, "time/reference_s": 0.0})
        self._pending = [{k: v.copy() for k, v in b.items()} for b in self._buffer]
        self.iteration = (self.iteration + 1) % self.mu

    def next_batch(self):
        if not self._pending:  # called outside the loop (tools): one step's worth
            self.prepare_step(self.cfg.train.grad_accum)
        return self.ops.to_batch(self.model, self._pending.pop(0))

    @contextmanager
    def _eval_mode(self):
        """No dropout for the passes that are not the step's (sampling, π_old, the reference); as it was after."""
        training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            if training:
                self.model.train()

    def _generate_ids(self, prompts: list[np.ndarray], temp: float, batch_size: int, **kw) -> list[list[int]]:
        with self._eval_mode(), self.ops.sampling_weights(self.model, self._dense):
            return generation.generate(self.ops, self.model, self.tokenizer, [np.asarray(p).tolist() for p in prompts],
                                       self.cfg.grpo.max_new_tokens, temp, batch_size, **kw)

    def _sample(self, prompts: list[np.ndarray]) -> list[list[int]]:
        """Each prompt's completion token ids (the end-of-turn token left out), sampled with grpo's settings; only
        the tokenizer's eos ends a completion (the token appended to those that stopped)."""
        g = self.cfg.grpo
        return self._generate_ids(prompts, g.temperature, g.sample_batch_size or len(prompts), top_p=g.top_p,
                                  stop=[self.eos])

    def _score(self, rows: list, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(per-function rewards, weighted totals) of the completions `ids` (no end token) to the prompt rows."""
        texts = [self.hf.decode(c, skip_special_tokens=True) for c in ids]
        columns = {k: [r.columns.get(k) for r in rows] for k in (rows[0].columns if rows else {})}
        return self.rewards.score([r.given for r in rows], texts, columns, [r.where for r in rows])

    def _generate(self, micro_batches: int) -> tuple[list[dict], dict]:
        g, world, f = self.cfg.grpo, self.world, len(self.names)
        group = [r for i in self.next_indices() for r in [self.rows[i]] * self.G]  # prompt by prompt: G rows each
        # this rank's part, all local (a failure here is carried by the exchange below, so no rank waits alone)
        failed, mine, batches, times = None, np.zeros((len(group), f + 3), np.float32), [], (0.0, 0.0)
        try:
            mine, batches, times = self._local_generation(group, micro_batches)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank by exchange()
            failed = exc
        slots = np.zeros((world.size, *mine.shape), np.float32)
        slots[world.rank] = mine
        new_tokens = float(mine[:, f + 1].sum())
        totals = exchange(world, [*slots.ravel().tolist(), new_tokens, times[0]], failed, "sampling GRPO completions")
        everyone = np.asarray(totals[:slots.size], np.float64).reshape(-1, f + 3)
        # advantages over the GLOBAL batch (scale_rewards "batch" needs every rank's rewards)
        adv = group_advantages(everyone[:, f], self.G, g.scale_rewards).reshape(world.size, -1)[world.rank]
        size = len(group) // micro_batches
        for m, b in enumerate(batches):
            b["advantages"] = adv[m * size:(m + 1) * size].astype(np.float32)
        metrics = self._generation_metrics(everyone, f)
        metrics.update({"sampling_tok_s": float(totals[-2]) / max(float(totals[-1]), 1e-9),
                        "time/sampling_s": times[0], "time/reference_s": times[1]})
        return batches, metrics

    def _local_generation(self, group: list, micro_batches: int) -> tuple[np.ndarray, list[dict], tuple]:
        """Sample, score, and build this rank's micro-batches (all but their advantages): ([per-function rewards,
        total, completion length with its end-of-turn token, stopped] per completion, batches, (sampling s,
        reference s))."""
        with self._eval_mode():
            return self._sampled_batches(group, micro_batches)

    def _sampled_batches(self, group: list, micro_batches: int) -> tuple[np.ndarray, list[dict], tuple]:
        g = self.cfg.grpo
        tic = time.perf_counter()
        sampled = self._sample([r.prompt for r in group])
        sample_s = time.perf_counter() - tic
        stopped = np.array([len(c) < g.max_new_tokens for c in sampled])
        completions = [list(c) + [self.eos] if s else list(c) for c, s in zip(sampled, stopped)]
        per_fn, total = self._score(group, sampled)
        seqs = [(r.prompt, np.asarray(c, np.int32)) for r, c in zip(group, completions)]
        size = len(seqs) // micro_batches
        batches = []
        for m in range(micro_batches):
            part = slice(m * size, (m + 1) * size)
            b = fdata.collate_completions(seqs[part], self.pad)
            if g.mask_truncated_completions:  # a completion cut at max_new_tokens teaches nothing (DAPO)
                b["mask"] = b["mask"] * stopped[part, None].astype(np.float32)
            b = fdata.add_loss_positions(b, self.cap)
            b["temperature"] = np.array([g.temperature], np.float32)  # log-probs of what was sampled from
            if self.mu > 1:
                b["old_logps"] = self._no_grad_logps(b)
            batches.append(b)
        tic = time.perf_counter()
        if g.beta:
            for b, ref in zip(batches, self._reference_logps(batches)):
                b["ref_logps"] = ref
        ref_s = time.perf_counter() - tic
        table = np.column_stack([per_fn, total, [len(c) for c in completions], stopped]).astype(np.float32)
        return table, batches, (sample_s, ref_s)

    def _generation_metrics(self, everyone: np.ndarray, f: int) -> dict:
        """TRL's logged reward statistics over the global batch."""
        total, length, stopped = everyone[:, f], everyone[:, f + 1], everyone[:, f + 2]
        grouped = total.reshape(-1, self.G)
        with warnings.catch_warnings():  # a group no reward could score: NaN, as TRL logs it
            warnings.simplefilter("ignore", RuntimeWarning)
            std = np.nanstd(total, ddof=1) if self.cfg.grpo.scale_rewards == "batch" else \
                np.nanmean(np.nanstd(grouped, axis=1, ddof=1))
            out = {"reward": float(np.nanmean(total)), "reward_std": float(std),
                   "frac_reward_zero_std": float(np.mean(np.nanstd(grouped, axis=1) < 1e-8)),
                   "completions/mean_length": float(length.mean()),
                   "completions/clipped_ratio": float(1.0 - stopped.mean())}
            for j, name in enumerate(self.names):
                out[f"rewards/{name}/mean"] = float(np.nanmean(everyone[:, j]))
        return out

    def _no_grad_logps(self, b: dict) -> np.ndarray:
        scored = {k: b[k] for k in SCORED if k in b}  # one compiled shape whatever else the batch carries
        return self.ops.to_numpy(self._logps(self.ops.to_batch(self.model, scored))).astype(np.float32)

    def _reference_logps(self, batches: list[dict]) -> list[np.ndarray]:
        """The policy at init on these completions: step 0's adapter weights in, one no-grad pass per micro-batch,
        ours back (one swap per generation)."""
        now = self.ops.adapter_state(self.model)
        self.ops.set_adapter_state(self.model, self.init_adapter)
        try:
            return [self._no_grad_logps(b) for b in batches]
        finally:
            self.ops.set_adapter_state(self.model, now)

    def metric_means(self, sums: dict, count: float) -> dict:
        tokens = max(sums.pop("tokens", 0.0), 1.0)
        out = {k: v / tokens for k, v in sums.items() if k in METRICS}
        return {**out, **self._gen_metrics}

    # ------------------------------------------------------------------ held-out reward

    def evaluate(self) -> dict:
        """The held-out prompts answered greedily, once each, and scored: mean reward (and per function)."""
        if not self.valid:
            return {}
        rows = self.valid[: self.cfg.train.eval_batches * self.cfg.train.batch_size or None]
        part = rows[self.world.rank::self.world.size]
        f = len(self.names)
        sums = np.zeros(2 * f + 4)
        if part:
            ids = self._generate_ids([r.prompt for r in part], 0.0, self.cfg.grpo.sample_batch_size or 32)
            per_fn, total = self._score(part, ids)
            sums[:f], sums[f:2 * f] = np.nansum(per_fn, 0), np.isfinite(per_fn).sum(0)
            sums[2 * f:] = [np.nansum(total), np.isfinite(total).sum(), sum(map(len, ids)), len(ids)]
        sums = self.world.sum(sums)
        out = {"reward": float(sums[2 * f] / max(sums[2 * f + 1], 1)),
               "completions/mean_length": float(sums[2 * f + 2] / max(sums[2 * f + 3], 1))}
        for j, name in enumerate(self.names):
            out[f"rewards/{name}/mean"] = float(sums[j] / max(sums[f + j], 1))
        return out


def _prompt_loader(max_new_tokens: int):
    def load_prompts(path, tokenizer, data_cfg, max_seq_len):
        return fdata.load_prompts(path, tokenizer, data_cfg, max_seq_len, max_new_tokens)
    return load_prompts


def _gathered(world: World, arrays: dict) -> dict:
    """{key: (ranks, *largest shape) every rank's array zero-padded, key#shape: (ranks, ndim) their shapes} for each
    array, summed over ranks in one exchange (float32 on the wire: token ids are exact below 2^24)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    shapes = {}
    for k, a in arrays.items():
        s = np.zeros((world.size, a.ndim), np.float32)
        s[world.rank] = a.shape
        shapes[k] = s
    flat = world.sum(np.concatenate([s.ravel() for s in shapes.values()]))
    out, at = {}, 0
    for k, s in shapes.items():
        shapes[k] = np.asarray(flat[at:at + s.size]).reshape(s.shape).astype(np.int64)
        at += s.size
    padded = {}
    for k, a in arrays.items():
        p = np.zeros((world.size, *shapes[k].max(0)), np.float32)
        p[world.rank][tuple(slice(0, d) for d in a.shape)] = a
        padded[k] = p
    summed = world.sum(np.concatenate([p.ravel() for p in padded.values()]))
    at = 0
    for k, p in padded.items():
        out[k] = np.asarray(summed[at:at + p.size], np.float32).reshape(p.shape)
        out[f"{k}#shape"] = shapes[k]
        at += p.size
    return out


def _ungathered(world: World, arrays: dict) -> list[dict]:
    """This rank's micro-batches from _gathered's arrays."""
    buffer: dict[int, dict] = {}
    for key, value in arrays.items():
        if key.endswith("#shape"):
            continue
        m, name = key.split("/", 1)
        shape = tuple(int(d) for d in arrays[f"{key}#shape"][world.rank])
        part = value[world.rank][tuple(slice(0, d) for d in shape)]
        buffer.setdefault(int(m), {})[name] = part.astype(np.int32 if name in ("inputs", "targets", "loss_positions")
                                                          else np.float32)
    return [buffer[m] for m in sorted(buffer)]
