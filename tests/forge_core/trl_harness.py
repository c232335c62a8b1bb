"""TRL 1.16's own loss code, run on given per-sequence log-probs (no model, no dataset).

DPOTrainer._compute_loss and KTOTrainer._compute_loss take a model and a tokenized batch; here the "model"
is a stand-in whose outputs carry per-token log-probs that sum to the log-probs we choose, and `self` holds only the attributes those methods read. ORPO's
odds_ratio_loss and CPO's cpo_loss already take log-probs. What TRL returns is compared with
forge_core/losses on numpy, mlx and torch in test_losses_trl.py.
"""

from __future__ import annotations

import os
import types
from collections import defaultdict

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental in 1.16

import numpy as np
import torch
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

WIDTH = 24  # tokens per row in the stand-in batches; every completion is shorter


class _Accelerator:
    device = torch.device("cpu")

    num_processes = 1

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _self(**attrs):
    return types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=_Accelerator(),
                                 aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
                                 _total_train_tokens=0, _tp_size=1, **attrs)


def _rows(logps: np.ndarray, ntok: np.ndarray):
    """(input_ids, completion_mask, per-token log-probs of the shifted targets) for rows whose completion
    log-prob sums are `logps` over `ntok` tokens each (the last ntok tokens of the row; the mask's counts are
    what TRL's per-token losses divide by)."""
    n = len(logps)
    mask = np.zeros((n, WIDTH), np.int64)
    per_token = np.zeros((n, WIDTH - 1), np.float64)
    for i, (lp, k) in enumerate(zip(logps, ntok)):
        k = int(k)
        mask[i, WIDTH - k:] = 1
        per_token[i, -1] = lp  # the whole sum on one scored token, so TRL's sum is exactly lp (ties stay ties)
    ids = torch.arange(n * WIDTH).reshape(n, WIDTH) % 50
    return ids, torch.from_numpy(mask), torch.from_numpy(per_token)


def _outputs(per_token):
    return types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                                 mean_logits=torch.zeros_like(per_token),
                                 is_top1=torch.zeros(per_token.shape, dtype=torch.bool))


def dpo(pol, ref, ntok, beta, loss_type, label_smoothing=0.0, discopop_tau=0.05) -> tuple[float, dict]:
    """TRL's DPO loss (mean over pairs) and its logged metrics. pol, ref, ntok: (2B,) chosen then rejected."""
    ids, mask, per_token = _rows(pol, ntok)
    n = len(pol) // 2
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": torch.from_numpy(ref[:n].astype(np.float64)),
              "ref_rejected_logps": torch.from_numpy(ref[n:].astype(np.float64))}
    me = _self(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
               loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
               args=types.SimpleNamespace(discopop_tau=discopop_tau))
    loss = DPOTrainer._compute_loss(me, lambda **kw: _outputs(per_token), inputs, False)
    return float(loss), {k: v[0] for k, v in me._metrics["train"].items()}


def kto(pol, ref, labels, pol_kl, ref_kl, ntok, beta, loss_type="kto", desirable_weight=1.0,
        undesirable_weight=1.0) -> tuple[float, dict]:
    """TRL's KTO loss (mean over rows) and metrics; pol_kl / ref_kl: the mismatched pairs' log-probs."""
    ids, mask, per_token = _rows(pol, ntok)
    kl_ids, kl_mask, kl_per_token = _rows(pol_kl, ntok)
    kl_ids = kl_ids + 100  # a different tensor: the stand-in model answers by which input it gets
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_mask,
              "label": torch.tensor(labels, dtype=torch.bool),
              "ref_logps": torch.from_numpy(ref.astype(np.float64)),
              "ref_KL_logps": torch.from_numpy(ref_kl.astype(np.float64))}

    def model(input_ids, **kw):
        return _outputs(kl_per_token if input_ids is kl_ids else per_token)

    me = _self(calculate_KL=loss_type == "kto", loss_type=loss_type, beta=beta, desirable_weight=desirable_weight,
               undesirable_weight=undesirable_weight, precompute_ref_logps=True)
    me._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(me, m, batch)
    loss = KTOTrainer._compute_loss(me, model, inputs, False)
    return float(loss), {k: v[0] for k, v in me._metrics["train"].items()}


def orpo(avg_c, avg_r, beta):
    """ORPOTrainer.odds_ratio_loss on per-token mean log-probs: (losses = β·log σ(log_odds), chosen rewards,
    rejected rewards, mean log σ(log_odds), mean log_odds), as numpy."""
    me = _self(beta=beta)
    out = ORPOTrainer.odds_ratio_loss(me, torch.from_numpy(avg_c), torch.from_numpy(avg_r))
    return [np.asarray(o.detach().numpy(), np.float64) for o in out]


def cpo(lp_c, lp_r, beta, loss_type, label_smoothing=0.0, simpo_gamma=0.5):
    """CPOTrainer.cpo_loss: (per-pair losses, chosen rewards, rejected rewards), as numpy."""
    me = _self(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, alpha=0.0)
    out = CPOTrainer.cpo_loss(me, torch.from_numpy(lp_c), torch.from_numpy(lp_r))
    return [np.asarray(o.detach().numpy(), np.float64) for o in out]


def grpo(logps, old, ref, advantages, mask, loss_type, beta, epsilon_low, epsilon_high, max_completion_length,
         level="token", delta=None) -> tuple[float, dict]:
    """GRPOTrainer._compute_loss on given per-token log-probs (B, T) of the completion tokens: the loss of one
    micro-batch (no accumulation, one process) and its logged metrics."""
    logps, mask = torch.from_numpy(logps), torch.from_numpy(mask)
    n, t = logps.shape
    inputs = {"prompt_ids": torch.zeros((n, 2), dtype=torch.long), "prompt_mask": torch.ones((n, 2), dtype=torch.long),
              "completion_ids": torch.zeros((n, t), dtype=torch.long), "completion_mask": mask,
              "advantages": torch.from_numpy(advantages), "old_per_token_logps": torch.from_numpy(old),
              "ref_per_token_logps": torch.from_numpy(ref), "num_items_in_batch": mask.sum()}
    me = _self(top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
               loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=False,
               current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
               _entropy_bonus_enabled=False,
               args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1))
    me._get_per_token_logps_and_entropies = lambda *a, **kw: (logps, torch.zeros_like(logps), None)
    loss = GRPOTrainer._compute_loss(me, None, inputs)
    return float(loss), {k: v[0] for k, v in me._metrics["train"].items()}
