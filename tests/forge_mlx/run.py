"""The core loop and eval bound to forge_mlx's ops."""

from forge_mlx import ops
from tests.bound import bind

train, load_adapted, evaluate, evaluate_preferences, heldout_loss, generate = bind(ops)
