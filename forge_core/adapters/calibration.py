"""The calibration set of a post-training quantization (forge export --quantize awq|gptq|dwq): token sequences cut
from the run's own training rows, chat-templated exactly as they were trained (or from --calib FILE, any data source
forge reads), so the quantizer keeps what the fine-tune is for. Framework-free: numpy ids in, the backend quantizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from forge_core.config_parse import from_dict
from forge_core.errors import ForgeError

QUANTIZERS = ("rtn", "awq", "gptq", "dwq")  # export --quantize: mlx_lm.convert's rounding, mlx-lm's AWQ, GPTQ, DWQ
SEQ_LEN = 256  # tokens per calibration sequence
SAMPLES = 128  # sequences at most (mlx-lm's AWQ default)
MIN_SEQUENCES = {"dwq": 2}  # dwq holds one out for its validation; the others calibrate on one


def calibration_tokens(forge_meta: dict, base: Path, calib: str | None = None, seq_len: int = SEQ_LEN,
                       samples: int = SAMPLES, method: str = "") -> np.ndarray:
    """(N, T) int32: the rows of `calib` (else the run's data.train) tokenized as the run tokenized them, joined
    and cut into T-token sequences, N of them at most in a fixed order (seed 0); fewer than `method` needs is one
    line, before any work."""
    from forge_core.data import load_sft, load_tokenizer

    cfg = from_dict(forge_meta.get("config") or {})
    source = calib or cfg.data.train
    if not source:
        raise ForgeError("--quantize: the run records no training data to calibrate on; pass --calib FILE")
    if not calib and not Path(source).exists():
        raise ForgeError(f"--quantize: the run's training data {source} is not here any more; pass --calib FILE")
    rows, _ = load_sft(source, load_tokenizer(base), cfg.data, cfg.train.max_seq_len)
    stream = np.concatenate([r.tokens for r in rows]).astype(np.int32)
    seq_len = min(seq_len, len(stream))
    chunks = stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len)
    need = MIN_SEQUENCES.get(method, 1)
    if len(chunks) < need:
        raise ForgeError(f"--quantize {method}: {source} gives {len(chunks)} calibration sequence(s) of {seq_len} "
                         f"tokens; it needs {need} at least (pass --calib with more rows)")
    order = np.random.default_rng(0).permutation(len(chunks))[:samples]
    return chunks[np.sort(order)]
