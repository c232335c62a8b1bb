"""Making training data: raft.py (RAFT rows from a codebase), copy_constraint.py (a local teacher that can only
quote its chunk), distill.py (a teacher's answers, best-of-N, DPO pairs), rewards.py (reward functions, shared with
GRPO)."""
