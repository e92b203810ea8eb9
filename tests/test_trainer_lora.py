"""The learner's memory options for large models, checked for exactness: LoRA
(trainer.lora.enabled, peft: adapters only, merged weights exported under the base model's names
with the learner's log-probs, a plain transformers checkpoint) and gradient checkpointing."""

import pytest
import torch
from ds_worker import fixed_batch

from agent.models import load_model
from trainer.checkpoint import save_checkpoint
from trainer.config import load_config
from trainer.learner import LogprobModel, TorchLearner, apply_lora

pytest.importorskip("peft", reason="needs peft (the `lora` extra; make setup installs it)")


def test_lora_trains_adapters_and_exports_merged_base_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            "trainer.lora.enabled=true",
            "trainer.lora.r=4",
            "trainer.lora.alpha=8",
            "trainer.lr=5e-2",
            "trainer.micro_batch_size=2",
        ],
    )
    base_names = set(load_model(tiny_model_dir).state_dict())
    lm = apply_lora(load_model(tiny_model_dir), cfg.trainer.lora)
    learner = TorchLearner(lm, cfg, torch.device("cpu"), total_updates=2)
    trainable = [name for name, p in learner.lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    batch = fixed_batch(learner.lm.config.vocab_size)
    before = dict(learner.named_weights())
    for _ in range(2):  # B starts at 0: the first step moves B, the second makes B @ A nonzero
        metrics = learner.update(batch, zeta=0.0, eps_high=0.28)
        assert metrics["grad/norm"] > 0
    after = dict(learner.named_weights())
    assert set(after) == base_names
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert any("q_proj" in k for k in moved)
    assert not any("embed_tokens" in k or "mlp" in k for k in moved)  # not adapted: unchanged

    # the exported weights in a plain model give the learner's log-probs
    plain = load_model(tiny_model_dir)
    plain.load_state_dict(after)
    with torch.no_grad():
        learner_lp, _ = learner.module(batch.input_ids, batch.attention_mask, batch.target_ids)
        plain_lp, _ = LogprobModel(plain)(batch.input_ids, batch.attention_mask, batch.target_ids)
    torch.testing.assert_close(plain_lp, learner_lp, atol=1e-5, rtol=0)

    final = save_checkpoint(
        tmp_path,
        2,
        learner=learner,
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
        trainer_state={"step": 2},
        save_optimizer=False,
        keep_last=1,
        is_main=True,
    )
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert set(loaded.state_dict()) == base_names
    torch.testing.assert_close(
        loaded.state_dict()["model.layers.0.self_attn.q_proj.weight"],
        after["model.layers.0.self_attn.q_proj.weight"],
    )


def test_gradient_checkpointing_gives_the_same_step(tiny_model_dir):
    """trainer.gradient_checkpointing recomputes activations in the backward: the same loss and
    the same new weights as keeping them (it changes memory, not the update)."""
    steps = {}
    for flag in (False, True):
        cfg = load_config(
            None,
            [
                f"model.name={tiny_model_dir}",
                "trainer.lr=1e-2",
                "trainer.micro_batch_size=2",
                f"trainer.gradient_checkpointing={str(flag).lower()}",
            ],
        )
        learner = TorchLearner(load_model(tiny_model_dir), cfg, torch.device("cpu"), 1)
        assert learner.lm.is_gradient_checkpointing == flag
        batch = fixed_batch(learner.lm.config.vocab_size)
        metrics = learner.update(batch, zeta=0.0, eps_high=0.28)
        steps[flag] = (metrics["loss/total"], dict(learner.named_weights()))
    assert steps[True][0] == pytest.approx(steps[False][0], rel=1e-6)
    for name, weight in steps[False][1].items():
        torch.testing.assert_close(steps[True][1][name], weight, atol=1e-6, rtol=1e-5)
