"""Memory: the pure per-component estimate (estimate.py), the device budget and size parsing (budget.py),
the plan with its verdict and suggestions and `forge memory` (plan.py), and the runtime guard that stops a
run cleanly when the measured peak passes the limit (guard.py)."""
