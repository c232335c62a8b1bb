"""The output head kept apart from the body, as in forge_mlx/head.py: the loss runs it only at the trained
positions, and (train.chunked_loss) head_chunk_rows(V, N, D) positions at a time, so the (positions x V) logits
are never whole - the fused linear cross-entropy of Liger / Unsloth. For Llama-3's 128k vocabulary at 4 x 2048
tokens the whole-logits path holds ~6 GiB of bf16 + fp32 logits and more for their gradient; chunked, a chunk's
logits are about the size of the hidden states (Liger's rule, so each chunk's matmul stays large on a GPU).

Only architectures whose logits are exactly lm_head(model.model(...)) split this way (split_head in
forge_core/models/architectures.py); the others, and a head that is not a plain bias-free nn.Linear, take the
model's own logits at every position.
"""

from __future__ import annotations

import torch
from torch import nn

from forge_core.memory.constants import head_chunk_rows
from forge_core.models.architectures import architecture


def head_weight(model: nn.Module) -> torch.Tensor | None:
    """The (V, D) weight the logits are h @ Wᵀ of, when the model splits (split_head, a bias-free nn.Linear head,
    train.chunked_loss on); None: the whole-logits path."""
    split = architecture(getattr(model.config, "model_type", None)).split_head
    if not getattr(model, "forge_chunked_loss", True) or not split:
        return None
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or not hasattr(model, "model"):
        return None
    return head.weight


def hidden(model: nn.Module, inputs: torch.Tensor, **kwargs) -> torch.Tensor:
    """Final-norm hidden states (B, T, D) of the body."""
    return model.model(input_ids=inputs, use_cache=False, **kwargs).last_hidden_state


def at_mask(h: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    """The hidden states (N, D) and targets (N,) of the positions where `mask` is not 0, and those positions' flat
    indices into (B·T,)."""
    where = mask.reshape(-1).nonzero()[:, 0]
    return h.reshape(-1, h.shape[-1])[where], targets.reshape(-1)[where], where


def chunked_nll(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """-log softmax(scale · h Wᵀ)[target] per row of h (N, D): (N,) fp32, head_chunk_rows(V, N, D) rows at a time in
    the forward and the backward (one more h Wᵀ per chunk: the backward recomputes the chunk's logits)."""
    return _ChunkedNLL.apply(h, w, targets, scale)


@torch.no_grad()
def chunked_scores(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of h (N, D): log softmax(h Wᵀ)[target] (fp32) and whether the target is the argmax, a chunk of rows
    at a time (lm-eval's loglikelihood without the whole logits)."""
    rows = head_chunk_rows(w.shape[0], h.shape[0], h.shape[1])
    logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    top = torch.empty(h.shape[0], dtype=torch.bool, device=h.device)
    for s in range(0, h.shape[0], rows):
        z, t = (h[s:s + rows] @ w.T).float(), targets[s:s + rows, None].long()
        logp[s:s + rows] = (z.gather(-1, t) - torch.logsumexp(z, dim=-1, keepdim=True))[:, 0]
        top[s:s + rows] = z.argmax(dim=-1) == t[:, 0]
    return logp, top


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, scale):
        rows = head_chunk_rows(w.shape[0], h.shape[0], h.shape[1])
        nll, lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device), []
        for s in range(0, h.shape[0], rows):
            z = (h[s:s + rows] @ w.T).float() * scale
            lse.append(torch.logsumexp(z, dim=-1))
            nll[s:s + rows] = lse[-1] - z.gather(-1, targets[s:s + rows, None].long())[:, 0]
            del z
        ctx.save_for_backward(h, w, targets, scale, torch.cat(lse) if lse else nll)
        return nll

    @staticmethod
    def backward(ctx, grad):
        h, w, targets, scale, lse = ctx.saved_tensors
        rows = head_chunk_rows(w.shape[0], h.shape[0], h.shape[1])
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(w, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], rows):
            hc = h[s:s + rows]
            # d nll / d z = softmax(z) - onehot(target), times the incoming gradient and the scale
            dz = torch.exp((hc @ w.T).float() * scale - lse[s:s + rows, None])
            dz[torch.arange(dz.shape[0], device=dz.device), targets[s:s + rows].long()] -= 1.0
            dz *= grad[s:s + rows, None] * scale
            if dh is not None:
                dh[s:s + rows] = (dz.to(w.dtype) @ w).to(h.dtype)
            if dw is not None:
                dw += dz.T @ hc.float()
            del dz
        return dh, (dw.to(w.dtype) if dw is not None else None), None, None
