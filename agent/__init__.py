"""eprl agents: policy backends (hf, vllm, openai) and the multi-turn rollout runner.

Names are imported lazily so that ``import agent`` does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "build_policy": "agent.backends",
    "PolicyConfig": "agent.config",
    "ChatFormat": "agent.chat",
    "Generation": "agent.policy",
    "HFPolicy": "agent.policy",
    "Episode": "agent.rollout",
    "RolloutRunner": "agent.rollout",
    "read_jsonl": "agent.rollout",
    "write_jsonl": "agent.rollout",
    "load_model": "agent.models",
    "load_tokenizer": "agent.models",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
