"""The core loop and eval bound to forge_cuda's ops."""

from forge_cuda import ops
from tests.bound import bind

train, load_adapted, evaluate, evaluate_preferences, heldout_loss, generate = bind(ops)
