"""eprl's trainer: advantages, objectives, the FP32 loss path, the learners, the training loop
and evaluation.

- ``config.py``: the typed run config; ``loop.py``: the recipe (``setup / train / train_step /
  update / evaluate / save_checkpoint / cleanup``);
- ``episodes.py`` (which episodes train), ``tasks.py`` (where tasks come from),
  ``distributed.py``, ``checkpoint.py``, ``logger.py`` (``metrics.jsonl``), ``report.py``;
- ``advantages.py``, ``objectives.py`` (losses and entropy controllers), ``precision.py`` (the
  FP32 loss path), ``learner.py`` / ``deepspeed_learner.py``;
- ``evaluation/`` (``eprl eval``) and ``demo.py`` (``make demo``).

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
