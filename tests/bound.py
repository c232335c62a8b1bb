"""forge_core's loop and eval bound to one backend's ops, as the backend tests call them."""

from functools import partial

from forge_core.eval import evaluate
from forge_core.train import train


def bind(ops):
    """(train, load_adapted, evaluate, evaluate_preferences, heldout_loss, generate) for `ops`."""
    return (partial(train, ops=ops), partial(evaluate.load_adapted, ops), partial(evaluate.evaluate, ops),
            partial(evaluate.evaluate_preferences, ops), partial(evaluate.heldout_loss, ops),
            partial(evaluate.generate, ops))
