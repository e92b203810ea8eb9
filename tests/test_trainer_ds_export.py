"""The streamed weight export's buckets (trainer.deepspeed_learner.stream_weights) on a plain
and a LoRA model in one process: whole modules per bucket, at most the bound unless one module
is larger, a LoRA layer's base weight and adapters together, and the stream equal to the full
export (merged LoRA weights under the base names) in the asked dtype."""

import pytest
import torch

from agent.models import load_model
from trainer.config import load_config
from trainer.deepspeed_learner import _export_groups, stream_weights
from trainer.learner import apply_lora, export_state


def test_buckets_hold_whole_modules_within_the_bound(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    state = lm.state_dict()
    bound = 20_000
    buckets = _export_groups(lm, bound)
    assert sorted(k for b in buckets for k in b) == sorted(state)  # every key once
    assert len(buckets) > 3
    for bucket in buckets:
        size = sum(state[k].numel() for k in bucket)
        modules = {k.rsplit(".", 1)[0] for k in bucket}
        assert size <= bound or len(modules) == 1, (bucket, size)
    # a module's weight and bias (or all of a module's tensors) never straddle two buckets
    owner = {k: i for i, b in enumerate(buckets) for k in b}
    for key in state:
        siblings = [k for k in state if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]]
        assert {owner[k] for k in siblings} == {owner[key]}


def test_stream_equals_the_full_export_in_the_sampler_dtype(tiny_model_dir):
    pytest.importorskip("peft", reason="needs peft (the `lora` extra; make setup installs it)")
    cfg = load_config(None, ["trainer.lora.enabled=true", "trainer.lora.r=4"])
    torch.manual_seed(0)
    lm = apply_lora(load_model(tiny_model_dir), cfg.trainer.lora)
    with torch.no_grad():  # nonzero adapters, so the merge shows
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_()
    full = export_state(lm, lm.state_dict())
    buckets = _export_groups(lm, 5_000)
    for bucket in buckets:  # an adapted layer's base weight travels with its adapters
        for key in bucket:
            if key.endswith(".base_layer.weight"):
                layer = key.rsplit(".base_layer.", 1)[0]
                assert f"{layer}.lora_A.default.weight" in bucket
    streamed = list(stream_weights(lm, torch.bfloat16, 5_000))
    assert [name for name, _ in streamed] == list(full)
    assert set(full) == set(load_model(tiny_model_dir).state_dict())
    for name, tensor in streamed:
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, full[name].to(torch.bfloat16), atol=0, rtol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(full[q], load_model(tiny_model_dir).state_dict()[q])  # merged
