"""Tokenized rows -> padded numpy batches: packing, epoch order, collation.

Shift convention (every collate): for a row of L tokens
    inputs  = tokens[:-1]   (T,)   what the model reads
    targets = tokens[1:]    (T,)   what it should predict at each position
    mask    = mask[1:]      (T,)   1.0 where targets[t] is scored
T = longest row - 1, rounded UP to pad_multiple, so a compiled step sees few distinct shapes.
Padding: inputs/targets = pad_id, mask = 0 (so the pad id never matters).

Packing contract for backends (PackedRow / the segment_ids, position_ids of collate_sft):
    segment_ids[b, t] = k >= 1 for tokens of the k-th row packed into sequence b, 0 for padding
    position_ids[b, t] = index of the token within its own row (restarts at 0 at each row)
    attention: query t may attend key s  iff  s <= t and segment_ids[b, s] == segment_ids[b, t]
               (block-diagonal causal; padding attends only to padding, which is never scored)
    RoPE: rotate with position_ids, not with arange(T)
With both, a packed sequence gives each row exactly the logits it would get alone. The loss mask
never crosses rows: a row's first token is never a target (mask[0] is False per row).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from forge_core.errors import ForgeError


@dataclass
class TokenizedRow:
    tokens: np.ndarray  # int32 (L,)
    mask: np.ndarray  # bool (L,): mask[i] True = token i is a loss target (predicted from tokens[:i])


@dataclass
class PreferenceRow:
    prompt: np.ndarray  # int32, the chat-templated prompt incl. the assistant header (generation prompt)
    chosen: np.ndarray  # int32, completion tokens incl. end-of-turn
    rejected: np.ndarray  # int32


@dataclass
class UnpairedRow:
    prompt: np.ndarray  # int32, as PreferenceRow's
    completion: np.ndarray  # int32
    label: bool  # desirable
    pair: int = -1  # index of the pair it was split from (-1: an unpaired row); held-out pairwise accuracy


@dataclass
class PromptRow:
    prompt: np.ndarray  # int32, the chat-templated prompt incl. the generation prompt (GRPO samples after it)
    given: object  # the prompt as the row gives it (a string or messages): what reward functions receive
    columns: dict  # the row's other columns, for the reward functions
    where: str  # "file:line", for errors that name the row


@dataclass
class PackedRow:
    tokens: np.ndarray  # int32 (L,), L <= max_seq_len: several rows back to back
    mask: np.ndarray  # bool (L,)
    segment_ids: np.ndarray  # int32 (L,): 1..k, which packed row each token belongs to
    position_ids: np.ndarray  # int32 (L,): position within its own row


def pack(rows: list[TokenizedRow], max_seq_len: int) -> list[PackedRow]:
    """Greedy best-fit-decreasing bin packing of rows into sequences of at most max_seq_len tokens.

    Longest rows first; each goes into the fullest sequence that still has room (O(n log n)).
    Deterministic: ties break by row index. Every row appears exactly once, whole.
    """
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].tokens), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for i in order:
        n = len(rows[i].tokens)
        if n > max_seq_len:
            raise ValueError(f"row {i} has {n} tokens > max_seq_len {max_seq_len}; truncate before packing")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            room, b = max_seq_len - n, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return [_packed([rows[i] for i in members]) for members in bins]


def _packed(rows: list[TokenizedRow]) -> PackedRow:
    masks = []
    for r in rows:
        m = r.mask.astype(bool).copy()
        m[:1] = False  # the first token of a row would be "predicted" from the previous row
        masks.append(m)
    return PackedRow(
        tokens=np.concatenate([r.tokens for r in rows]).astype(np.int32),
        mask=np.concatenate(masks),
        segment_ids=np.concatenate([np.full(len(r.tokens), k + 1, np.int32) for k, r in enumerate(rows)]),
        position_ids=np.concatenate([np.arange(len(r.tokens), dtype=np.int32) for r in rows]),
    )


def row_length(r) -> int:
    """Tokens a row brings to a batch: a pair its prompt and longer completion."""
    if isinstance(r, PreferenceRow):
        return len(r.prompt) + max(len(r.chosen), len(r.rejected))
    if isinstance(r, UnpairedRow):
        return len(r.prompt) + len(r.completion)
    return len(r.tokens)


def widest_batch(rows: list, max_len: int | None = None, pad_multiple: int = 32) -> int:
    """T of the widest batch the collates can make from `rows` (its longest row, padded as they pad)."""
    return _width(max(row_length(r) for r in rows), pad_multiple, max_len)


def _width(longest: int, pad_multiple: int, max_len: int | None = None) -> int:
    """T = (longest - 1) rounded up to pad_multiple, capped at max_len."""
    t = max(longest - 1, 1)
    t = -(-t // pad_multiple) * pad_multiple if pad_multiple > 1 else t
    return min(t, max_len) if max_len else t


def collate_sft(rows: list, pad_id: int, pad_multiple: int = 32, max_len: int | None = None) -> dict[str, np.ndarray]:
    """Rows (TokenizedRow or PackedRow) -> {inputs, targets (B,T) int32, mask (B,T) float32}.

    When any row is packed, also segment_ids and position_ids (B,T) int32 aligned with inputs (a plain
    row counts as one segment). Rows longer than T + 1 tokens (only when max_len caps T) are cut.
    """
    T = widest_batch(rows, max_len, pad_multiple)
    B = len(rows)
    packed = any(isinstance(r, PackedRow) for r in rows)
    inputs = np.full((B, T), pad_id, np.int32)
    targets = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.float32)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b, r in enumerate(rows):
        n = min(len(r.tokens) - 1, T)
        inputs[b, :n] = r.tokens[:n]
        targets[b, :n] = r.tokens[1:n + 1]
        m = r.mask[1:n + 1].astype(bool)
        if isinstance(r, PackedRow):
            s = r.segment_ids
            m = m & (s[1:n + 1] == s[:n])  # belt and braces: never score a target from another row
            seg[b, :n], pos[b, :n] = s[:n], r.position_ids[:n]
        else:
            seg[b, :n], pos[b, :n] = 1, np.arange(n)
        mask[b, :n] = m
    out = {"inputs": inputs, "targets": targets, "mask": mask}
    if packed:
        out.update(segment_ids=seg, position_ids=pos)
    return out


def add_loss_positions(batch: dict, row_cap: int = 0, buckets: int = 8) -> dict:
    """Add `loss_positions` (N,) int32, the flat (b·T + t) indices of the tokens with a loss weight,
    and `loss_weights` (N,) float32, their weights, so a backend can run the vocabulary head at those
    positions only. Padding entries are index 0 with weight 0.

    N is padded so that a compiled step sees few shapes (each new one is traced and compiled again):
    with `row_cap`, the most loss tokens any row of the dataset has (loss_row_cap), N = min(B·T, B·row_cap)
    for every batch of a given width; without it, N rounds up to a multiple of B·T/buckets.
    """
    m = batch["mask"].reshape(-1)
    idx = np.flatnonzero(m)
    if row_cap:
        n = max(len(idx), min(m.size, batch["mask"].shape[0] * row_cap))
    else:
        step = max(1, -(-m.size // buckets))
        n = max(step, -(-len(idx) // step) * step)
    pos, weights = np.zeros(n, np.int32), np.zeros(n, np.float32)
    pos[:len(idx)], weights[:len(idx)] = idx, m[idx]
    return {**batch, "loss_positions": pos, "loss_weights": weights}


def loss_row_cap(rows: list) -> int:
    """The most loss-carrying tokens one row can bring to a batch (SFT: its trained targets; DPO: the longer
    completion), for add_loss_positions."""
    def cap(r) -> int:
        if isinstance(r, PreferenceRow):
            return max(len(r.chosen), len(r.rejected))
        if isinstance(r, UnpairedRow):
            return len(r.completion)
        if isinstance(r, PromptRow):
            return 0  # GRPO: its completions are sampled, their cap is grpo.max_new_tokens
        return int(np.count_nonzero(r.mask[1:]))

    return max((cap(r) for r in rows), default=0)


def collate_dpo(rows: list[PreferenceRow], pad_id: int, pad_multiple: int = 32) -> dict[str, np.ndarray]:
    """One concatenated batch of 2B sequences: [prompt+chosen for each row] + [prompt+rejected for each row]."""
    return collate_completions([(r.prompt, r.chosen) for r in rows] + [(r.prompt, r.rejected) for r in rows],
                               pad_id, pad_multiple)


def collate_completions(seqs: list[tuple[np.ndarray, np.ndarray]], pad_id: int, pad_multiple: int = 32) -> dict:
    """(prompt, completion) pairs -> one batch of their concatenations.

    inputs/targets (N,T) int32, mask (N,T) float32 = 1 exactly where targets[t] is a completion token
    (t + 1 >= len(prompt)); the prompt is never scored. Sequence log-prob = sum(logp(targets) * mask).
    """
    T = _width(max(len(p) + len(c) for p, c in seqs), pad_multiple)
    inputs = np.full((len(seqs), T), pad_id, np.int32)
    targets = np.full((len(seqs), T), pad_id, np.int32)
    mask = np.zeros((len(seqs), T), np.float32)
    for b, (p, c) in enumerate(seqs):
        full = np.concatenate([p, c]).astype(np.int32)
        n = len(full) - 1
        inputs[b, :n], targets[b, :n] = full[:-1], full[1:]
        mask[b, max(len(p) - 1, 0):n] = 1.0  # targets[t] = full[t+1] is a completion token iff t+1 >= len(p)
    return {"inputs": inputs, "targets": targets, "mask": mask}


class BatchOrder:
    """Deterministic epoch-wise shuffled order of row indices; state() / from_state() make it resumable.

    Epoch e visits rows in permutation(default_rng(seed + e)) (or 0..n-1 without shuffle), batch_size at a
    time; the last partial batch of an epoch is dropped when n_rows >= batch_size (every batch full, so
    compiled steps see one shape). With n_rows < batch_size each batch is the whole epoch (n_rows rows).
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, shuffle: bool = True):
        if n_rows < 1:
            raise ForgeError("no data rows to make batches from")
        if batch_size < 1:
            raise ForgeError(f"train.batch_size must be at least 1, got {batch_size}")
        self.n_rows, self.batch_size, self.seed, self.shuffle = n_rows, batch_size, seed, shuffle
        self._epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_rows)
        return np.random.default_rng((self.seed + epoch) % 2**63).permutation(self.n_rows)

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.n_rows // self.batch_size)

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed (1.0 right after the last batch of the first epoch)."""
        return self._epoch + self.position / self.n_rows

    def next_batch(self) -> list[int]:
        size = min(self.batch_size, self.n_rows)
        batch = self._order[self.position:self.position + size].tolist()
        self.position += size
        if self.position + size > self.n_rows:  # no full batch left: start the next epoch now
            self._epoch, self.position = self._epoch + 1, 0
            self._order = self._permutation(self._epoch)
        return batch

    def state(self) -> dict:
        return {"epoch": self._epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "n_rows": self.n_rows, "batch_size": self.batch_size}

    @classmethod
    def from_state(cls, n_rows: int, batch_size: int, state: dict) -> BatchOrder:
        for key, now in (("n_rows", n_rows), ("batch_size", batch_size)):
            if key in state and state[key] != now:
                raise ForgeError(f"resume: the checkpoint's data order was made with {key}={state[key]}, "
                                 f"now {key}={now}; resume with the same data and batch size")
        order = cls(n_rows, batch_size, int(state["seed"]), bool(state.get("shuffle", True)))
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < n_rows:
            raise ForgeError(f"resume: data position {position} (epoch {epoch}) is outside {n_rows} rows")
        order._epoch, order.position = epoch, position
        order._order = order._permutation(epoch)
        return order


def shared_prefix(seqs: list, least: int = 16, keep: int = 2) -> int:
    """How many tokens every sequence of `seqs` starts with, each keeping at least `keep` of its own; 0 when
    fewer than `least` (not worth a cache). Rows of one chat format with one system prompt share the whole
    system turn: a backend runs it once and every row continues from its KV cache."""
    if len(seqs) < 2:
        return 0
    n = min(len(s) for s in seqs) - keep
    first = seqs[0]
    for s in seqs[1:]:
        n = next((i for i in range(max(n, 0)) if s[i] != first[i]), n)
    return n if n >= least else 0
