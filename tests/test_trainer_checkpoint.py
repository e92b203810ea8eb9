"""Checkpoints write the weights streamed, in shards (trainer/checkpoint.py): the folder is what
``save_pretrained`` writes and loads in transformers as it is, while rank 0 holds at most one
shard of the model at a time (the 2-rank ZeRO-3 path runs through the DeepSpeed tests' runs)."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent.models import load_model
from trainer.checkpoint import WEIGHTS_INDEX, save_checkpoint, write_weights
from trainer.config import load_config
from trainer.learner import TorchLearner, hf_model


def _learner(model_dir):
    cfg = load_config(None, [f"model.name={model_dir}"])
    return TorchLearner(load_model(model_dir), cfg, torch.device("cpu"), total_updates=1)


def _files(folder):
    return {
        path.name
        for path in folder.iterdir()
        if path.suffix in (".json", ".safetensors") and "token" not in path.name
    }


def _tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def test_streamed_shards_are_what_save_pretrained_writes_and_hold_one_shard(
    tiny_model_dir, tmp_path
):
    learner = _learner(tiny_model_dir)
    weights = dict(learner.named_weights())
    reference = tmp_path / "reference"
    hf_model(learner.lm).save_pretrained(reference, state_dict=weights, safe_serialization=True)

    written = {k: t for k, t in weights.items() if k != "lm_head.weight"}  # tied: left out
    largest = max(t.numel() * t.element_size() for t in written.values())
    total = sum(t.numel() * t.element_size() for t in written.values())
    # the embedding (most of this tiny model) fills a shard alone, the rest several more
    limit = (total - largest) // 3
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    peak = write_weights(hf_model(learner.lm), learner.named_weights(), streamed, limit)
    assert peak <= max(limit, largest) < total  # never the whole model at once

    index = json.loads((streamed / WEIGHTS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(written)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((streamed / name).read_text()) == json.loads(
            (reference / name).read_text()
        ), name
    got, want = _tensors(streamed), _tensors(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    loaded = AutoModelForCausalLM.from_pretrained(streamed)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_save_checkpoint_streams_in_shards_of_the_configured_size_and_loads(
    tiny_model_dir, tmp_path
):
    """One shard of the whole model at the default 5 GB (``model.safetensors``, no index), and
    several at a tiny ``max_shard_gb``: both load in transformers with the learner's weights."""
    learner = _learner(tiny_model_dir)
    with torch.no_grad():  # weights the checkpoint could only get from the learner
        next(learner.lm.parameters()).add_(0.5)
    weights = dict(learner.named_weights())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def save(run_dir, shard_gb):
        return save_checkpoint(
            run_dir,
            1,
            learner=learner,
            tokenizer=tokenizer,
            trainer_state={"step": 1},
            save_optimizer=False,
            keep_last=1,
            is_main=True,
            max_shard_gb=shard_gb,
        )

    whole = save(tmp_path / "whole", 5.0)
    assert _files(whole) == {"config.json", "generation_config.json", "model.safetensors"}
    sharded = save(tmp_path / "sharded", 2e-3)  # 2 MB
    assert WEIGHTS_INDEX in _files(sharded) and len(list(sharded.glob("model-*"))) > 1
    assert not list(sharded.glob(".shard_*"))
    for folder in (whole, sharded):
        state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        assert all(torch.equal(state[k], weights[k]) for k in weights), folder.name


def test_a_model_transformers_converts_on_save_is_written_by_save_pretrained(
    tiny_model_dir, tmp_path
):
    """Fused MoE experts are re-split into the checkpoint layout by ``save_pretrained`` only:
    such a model takes that path (and still loads back as trained); dense models stream."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from trainer.checkpoint import _converts_on_save

    assert not _converts_on_save(load_model(tiny_model_dir))
    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_experts=2,
        num_experts_per_tok=1,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    moe_dir = tmp_path / "moe"
    Qwen3MoeForCausalLM(config).save_pretrained(moe_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(moe_dir)
    learner = _learner(moe_dir)
    assert _converts_on_save(hf_model(learner.lm))
    with torch.no_grad():
        next(learner.lm.parameters()).add_(0.5)
    weights = dict(learner.named_weights())
    final = save_checkpoint(
        tmp_path / "run",
        1,
        learner=learner,
        tokenizer=AutoTokenizer.from_pretrained(moe_dir),
        trainer_state={"step": 1},
        save_optimizer=False,
        keep_last=1,
        is_main=True,
    )
    state = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
