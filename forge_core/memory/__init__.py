"""Memory: the pure per-component estimate (estimate.py; the model's shape and a plan's lines in shape.py, the
stored base in weights.py, the build, the init cache's disk and GRPO's sampling in build.py; measured constants in
constants.py), the data's shape (data_shape.py), the device budget and size parsing (budget.py), the plan with its
verdict and suggestions and `forge memory` (plan.py), and the runtime guard that stops a run cleanly when the
measured peak passes the limit (guard.py)."""
