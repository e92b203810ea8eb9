"""Held-out guard: no shipped config trains on a held-out split or on its own evaluation split."""

from pathlib import Path

import pytest

from trainer.config import ConfigError, load_config
from trainer.tasks import make_env_factory, split_task_ids

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = {"test", "test_normal", "test_challenge"}
# run configs only: configs/serve.yaml is the service's (tests/test_serving_config.py)
SHIPPED = sorted(p for p in REPO.glob("configs/*.yaml") if p.name != "serve.yaml") + sorted(
    REPO.glob("benchmarks/entropy_study/configs/*.yaml")
)


def test_there_are_shipped_configs():
    assert (REPO / "configs" / "quickstart.yaml") in SHIPPED
    assert len(list(REPO.glob("benchmarks/entropy_study/configs/*.yaml"))) >= 7


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_passes_the_held_out_guard(path):
    cfg = load_config(path)  # RunConfig itself refuses env.train_split == eval.split
    assert cfg.env.train_split not in HELD_OUT, (
        f"{path} trains on the held-out split {cfg.env.train_split!r}"
    )
    assert cfg.env.train_split != cfg.eval.split
    if cfg.env.id == "eprl/CodeExec-v0" and not cfg.env.urls:
        # the same check Trainer.setup makes: the two splits share no task id
        make_env = make_env_factory(cfg)
        train = set(split_task_ids(make_env, cfg.env.train_split))
        held_out = set(split_task_ids(make_env, cfg.eval.split))
        assert train and held_out and not train & held_out


def test_loader_refuses_training_on_the_evaluation_split(tmp_path):
    with pytest.raises(ConfigError, match="must be held out"):
        load_config(REPO / "configs" / "quickstart.yaml", ["eval.split=train"])
