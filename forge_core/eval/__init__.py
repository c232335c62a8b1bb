"""Measuring a model: evaluate.py (held-out loss and task metrics, generation with an adapter), metrics.py (exact,
json_fields), perplexity.py (a text file's sliding windows), lm_eval_bridge.py (lm-evaluation-harness tasks;
lm_eval_tasks/: forge's own), generation.py (chat prompts and decoding shared by both backends)."""
