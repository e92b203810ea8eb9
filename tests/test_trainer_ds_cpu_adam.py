"""DeepSpeed's own CPU Adam: what steps the offloaded optimizer on a GPU machine
(``trainer.deepspeed.offload_adam=auto``), forced on the CPU here with ``offload_adam=deepspeed``
on 2 gloo ranks, ZeRO-2 and ZeRO-3, against torch AdamW with the same hyperparameters.

The op is JIT-compiled on first use (about 1-2 minutes on 2 cores, then cached under
``~/.cache/torch_extensions``), which the default suite cannot afford: that test runs only with
``EPRL_TEST_DS_OPS=1``. The choice of optimizer itself is checked without it."""

import os

import pytest
import torch
from test_trainer_ds_grads import assert_matches_reference, run_worker, torch_reference

from trainer.config import ConfigError, load_config
from trainer.deepspeed_learner import deepspeed_config

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
# given the same gradients (one engine, one reduction order) DeepSpeed's CPU Adam and torch
# AdamW differ only in their fp32 rounding: measured 1.2e-7, one ulp of a weight near 1, after
# three steps; 1e-6 leaves 8 ulps against updates of about 3e-3 (3 steps x lr), so a dropped
# lr, beta, weight decay or bias correction shows. Against the single-process learner the
# gradients themselves differ in the last bits (reduction order, <= 4e-7), which Adam's
# normalisation amplifies on small coordinates: measured 1.75e-6 for both optimizers, checked at
# the 1e-5 of the other exactness tests.
SAME_GRADIENTS_ATOL = 1e-6


def config(*overrides):
    return load_config(None, ["trainer.learner=deepspeed", *overrides])


@pytest.mark.parametrize(
    "overrides, device, ds_adam",
    [
        ([], GPU, False),  # no offload: the torch optimizer on the device
        (["trainer.deepspeed.offload_optimizer=true"], GPU, True),
        (["trainer.deepspeed.offload_optimizer=true"], CPU, False),  # no op to compile
        (
            [
                "trainer.deepspeed.offload_optimizer=true",
                "trainer.deepspeed.offload_adam=deepspeed",
            ],
            CPU,
            True,
        ),
        (
            ["trainer.deepspeed.offload_optimizer=true", "trainer.deepspeed.offload_adam=torch"],
            GPU,
            False,
        ),
        (["trainer.deepspeed.offload_optimizer=true", "trainer.optimizer=sgd"], GPU, False),
    ],
)
def test_offload_adam_picks_deepspeeds_cpu_adam_or_the_torch_optimizer(overrides, device, ds_adam):
    """DeepSpeed's CPU Adam comes from the engine config's ``optimizer`` section; otherwise the
    client (torch) optimizer steps, and with offload DeepSpeed must be told to accept it."""
    cfg = config(*overrides, "trainer.betas=[0.8,0.95]", "trainer.weight_decay=0.1")
    engine = deepspeed_config(cfg, device)
    if ds_adam:
        assert engine["optimizer"] == {
            "type": "AdamW",
            "params": {"lr": cfg.trainer.lr, "betas": [0.8, 0.95], "weight_decay": 0.1},
        }
        assert "zero_force_ds_cpu_optimizer" not in engine
    else:
        assert "optimizer" not in engine
        offload = cfg.trainer.deepspeed.offload_optimizer
        assert engine.get("zero_force_ds_cpu_optimizer", True) is not offload


def test_offload_adam_without_offload_or_with_sgd_is_refused():
    with pytest.raises(ConfigError, match=r"offload_adam='deepspeed'.*offload_optimizer=true"):
        config("trainer.deepspeed.offload_adam=deepspeed")
    with pytest.raises(ConfigError, match=r"offload_adam='deepspeed'.*optimizer='sgd'"):
        config(
            "trainer.deepspeed.offload_optimizer=true",
            "trainer.deepspeed.offload_adam=deepspeed",
            "trainer.optimizer=sgd",
        )


@pytest.mark.slow
@pytest.mark.timeout(900)  # the op's first compile, then four 2-rank runs
@pytest.mark.skipif(
    os.environ.get("EPRL_TEST_DS_OPS") != "1",
    reason="set EPRL_TEST_DS_OPS=1 to run it: it JIT-compiles DeepSpeed's cpu_adam op "
    "(g++, about 1-2 min once, cached in ~/.cache/torch_extensions)",
)
@pytest.mark.parametrize(
    "zero_stage, options",
    [(2, "offload,adamw"), (3, "init,offload,adamw")],
    ids=["zero2-offload", "zero3-partitioned-offload"],
)
def test_deepspeed_cpu_adam_steps_like_torch_adamw(tiny_model_dir, tmp_path, zero_stage, options):
    from agent.models import load_model

    ds_adam = run_worker(tiny_model_dir, tmp_path / "ds.pt", zero_stage, options + ",dsadam")
    torch_adam = run_worker(tiny_model_dir, tmp_path / "torch.pt", zero_stage, options)
    assert ds_adam["optimizer"] == "DeepSpeedCPUAdam"  # the GPU branch really ran
    assert torch_adam["optimizer"] == "AdamW"
    assert ds_adam["master_dtype"] == "torch.float32"
    # both against the single-process torch learner: gradients, weights, exported log-probs
    reference = torch_reference(tiny_model_dir, "adamw")
    assert_matches_reference(ds_adam, reference, tiny_model_dir)
    assert_matches_reference(torch_adam, reference, tiny_model_dir)
    # and against each other on the same gradients, where only the optimizer differs
    initial = load_model(tiny_model_dir).state_dict()
    for key, weight in torch_adam["weights"].items():
        update = (weight - initial[key]).abs().max().item()
        assert update > 1000 * SAME_GRADIENTS_ATOL, (key, update)  # the steps moved it
        torch.testing.assert_close(
            ds_adam["weights"][key],
            weight,
            atol=SAME_GRADIENTS_ATOL,
            rtol=0,
            msg=lambda m, k=key: f"{k}: {m}",
        )
