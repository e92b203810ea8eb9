"""eprl's trainer: advantages, objectives, the FP32 loss path (and later the learners and loop).

Names are imported lazily so that ``import trainer.config`` (the CLI) does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "compute_advantages": "trainer.advantages",
    "loop_keep_mask": "trainer.advantages",
    "LossInputs": "trainer.objectives",
    "policy_loss": "trainer.objectives",
    "ZetaController": "trainer.objectives",
    "EpsHighController": "trainer.objectives",
    "token_logprobs_and_entropy": "trainer.precision",
    "loss_compute_dtype": "trainer.precision",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
