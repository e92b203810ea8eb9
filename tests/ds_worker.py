"""One DeepSpeed learner step on a fixed batch, run by tests/test_trainer_deepspeed.py under
torchrun with 2 gloo processes on CPU. Rank r takes rows r::world of the batch; rank 0 writes
the loss (averaged over ranks), a hash of the updated weights, and precision checks to JSON."""

import json
import sys

import gymnasium
import torch

# the test env of tests/test_trainer_loop.py that a tiny model learns, for `eprl train` runs
# under torchrun: `env.id=ds_worker:eprl-test/DsDigit-v0` imports this module in every rank
DIGIT_ENV = "ds_worker:eprl-test/DsDigit-v0"
if "eprl-test/DsDigit-v0" not in gymnasium.registry:
    gymnasium.register(
        "eprl-test/DsDigit-v0",
        entry_point="test_trainer_loop:DigitRewardEnv",
        disable_env_checker=True,
    )


def fixed_batch(vocab: int, rows: int = 4, width: int = 12, uneven: bool = False):
    from trainer.learner import TrainBatch

    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (rows, width + 1), generator=generator)
    mask = torch.ones(rows, width)
    mask[:, :4] = 0  # a "prompt" of 4 tokens
    if uneven:  # answers of 8, 6, 4 and 2 tokens
        for row in range(rows):
            mask[row, 4 + 8 - 2 * row :] = 0
    return TrainBatch(
        input_ids=ids[:, :-1],
        attention_mask=torch.ones(rows, width, dtype=torch.long),
        target_ids=ids[:, 1:],
        loss_mask=mask,
        sampler_logprobs=torch.full((rows, width), -10.0),
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
    )


def lora_model(model_dir: str, cfg):
    """The tiny model with LoRA adapters initialised from a fixed seed (the same on every side)."""
    from agent.models import load_model
    from trainer.learner import apply_lora

    torch.manual_seed(0)
    return apply_lora(load_model(model_dir), cfg.trainer.lora)


LORA_OVERRIDES = ["trainer.lora.enabled=true", "trainer.lora.r=4", "trainer.lora.alpha=8"]


def main(
    model_dir: str, out: str, zero_stage: str, dtype: str, lora: str = "none", shard: str = "even"
) -> None:
    """``shard`` even: rank r takes rows r::world; uneven (2 ranks): rank 0 rows 0-2 with 18
    tokens, rank 1 row 3 with 2 tokens, so ranks differ in micro-batches and in tokens."""
    from agent.models import load_model
    from trainer.config import load_config
    from trainer.deepspeed_learner import DeepSpeedLearner
    from trainer.learner import hf_model
    from trainer.precision import reference_logprobs_and_entropy

    cfg = load_config(
        None,
        [
            f"model.name={model_dir}",
            "trainer.learner=deepspeed",
            "trainer.device=cpu",
            f"trainer.deepspeed.zero_stage={zero_stage}",
            f"model.dtype={dtype}",
            "trainer.lr=1e-3",
            "trainer.micro_batch_size=1",
            *(LORA_OVERRIDES if lora == "lora" else []),
        ],
    )
    lm = lora_model(model_dir, cfg) if lora == "lora" else load_model(model_dir)
    learner = DeepSpeedLearner(lm, cfg, torch.device("cpu"), total_updates=1)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    batch = fixed_batch(learner.lm.config.vocab_size, uneven=shard == "uneven")
    rows = list(range(rank, len(batch), world)) if shard == "even" else ([0, 1, 2], [3])[rank]
    shard = batch.rows(rows)
    shard.old_logprobs, _ = learner.logprobs(shard)

    # the FP32 path under the engine: fp32 log-probs even when the engine holds bf16 weights
    logprobs, _ = learner.engine(shard.input_ids, shard.attention_mask, shard.target_ids)
    causal_lm = hf_model(learner.lm)
    hidden = causal_lm.base_model(
        input_ids=shard.input_ids, attention_mask=shard.attention_mask
    ).last_hidden_state
    weight = causal_lm.get_output_embeddings().weight
    reference, _ = reference_logprobs_and_entropy(
        hidden.detach().double(),
        weight.detach().double(),
        shard.target_ids,
        compute_dtype=torch.float64,
    )
    fp32_error = float((logprobs.detach().double() - reference).abs().max())

    metrics = learner.update(shard, zeta=0.0, eps_high=0.28)
    loss = torch.tensor([metrics["loss/total"]], dtype=torch.float64)
    torch.distributed.all_reduce(loss)
    weights = dict(learner.named_weights())
    if rank == 0:
        Path = __import__("pathlib").Path
        Path(out).write_text(
            json.dumps(
                {
                    "loss": float(loss) / world,
                    "world": world,
                    "logprob_dtype": str(logprobs.dtype),
                    "param_dtype": str(next(learner.engine.module.parameters()).dtype),
                    "fp32_error": fp32_error,
                    "weights": {k: v.double().sum().item() for k, v in weights.items()},
                }
            )
        )


# (rows of rank 0, rows of rank 1) of the 4-row uneven batch (answers of 8, 6, 4, 2 tokens), one
# SGD step each, in order: the global batch is the same 4 rows every time
SCENARIOS = {
    "even": ([0, 2], [1, 3]),
    "uneven": ([0, 1, 2], [3]),
    "empty_rank": ([0, 1, 2, 3], []),
}
GRAD_OVERRIDES = ["trainer.optimizer=sgd", "trainer.lr=0.1", "trainer.micro_batch_size=1"]


def grads_main(model_dir: str, out_path: str, zero_stage: str, options: str = "") -> None:
    """The DeepSpeed learner's full gradients (``safe_get_full_grad``, reduced over ranks,
    before the step) and losses for each of :data:`SCENARIOS`, the weights after them, and the
    streamed export; ``options`` (comma-separated): ``init`` builds the model partitioned under
    zero.Init (transformers' ZeRO-3 integration), ``offload`` offloads the optimizer,
    ``bf16`` runs bf16 weights; rank 0 writes everything with torch.save."""
    from deepspeed.utils import safe_get_full_grad

    from agent.models import load_model
    from trainer.config import load_config
    from trainer.deepspeed_learner import (
        DeepSpeedLearner,
        empty_batch,
        init_distributed,
        zero3_construction,
    )
    from trainer.distributed import gather_objects

    flags = set(filter(None, options.split(",")))
    cfg = load_config(
        None,
        [
            f"model.name={model_dir}",
            "trainer.learner=deepspeed",
            "trainer.device=cpu",
            f"trainer.deepspeed.zero_stage={zero_stage}",
            f"trainer.deepspeed.offload_optimizer={'offload' in flags}",
            "trainer.deepspeed.export_bucket_numel=20000",  # many buckets on the tiny model
            f"model.dtype={'bfloat16' if 'bf16' in flags else 'float32'}",
            "policy.backend=vllm",  # (not started here) ZeRO-3 on 2 ranks refuses the hf policy
            *GRAD_OVERRIDES,
        ],
    )
    init_distributed(torch.device("cpu"), cfg.trainer.deepspeed.timeout_s)
    keep_alive = zero3_construction(cfg) if "init" in flags else None
    lm = load_model(model_dir)
    built = {
        "partitioned": [
            int(p.ds_tensor.numel()) for p in lm.parameters() if hasattr(p, "ds_tensor")
        ],
        "full": [int(getattr(p, "ds_numel", p.numel())) for p in lm.parameters()],
        "dtype": str(next(lm.parameters()).dtype),
    }
    learner = DeepSpeedLearner(lm, cfg, torch.device("cpu"), total_updates=len(SCENARIOS))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    batch = fixed_batch(learner.lm.config.vocab_size, uneven=True)
    result: dict = {"world": world, "built": built, "scenarios": {}}
    for name, shards in SCENARIOS.items():
        rows = shards[rank]
        shard = batch.rows(rows) if rows else empty_batch(batch.input_ids.shape[1])
        shard.old_logprobs, _ = learner.logprobs(shard)
        assert shard.old_logprobs.shape == shard.input_ids.shape
        out = learner.accumulate(shard, zeta=0.0, eps_high=0.28)
        grads = {
            key: safe_get_full_grad(param).detach().float().clone()
            for key, param in learner.lm.named_parameters()
        }
        out = learner.finish(out)
        every_rank = gather_objects(sorted(out))
        result["scenarios"][name] = {
            "same_keys_on_every_rank": all(keys == every_rank[0] for keys in every_rank),
            "loss": out["loss/total"],
            "grad_norm": out["grad/norm"],
            "nonfinite": out["nonfinite"],
            "keys": sorted(out),
            "grads": grads,
        }
    optimizer = learner.engine.optimizer
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None) or getattr(
        optimizer, "single_partition_of_fp32_groups", None
    )
    result["master_dtype"] = str(masters[0].dtype) if masters else None
    result["param_dtype"] = str(next(learner.engine.module.parameters()).dtype)
    weights = {}
    for key, tensor in learner.named_weights():
        weights[key] = tensor.clone()
    result["weights"] = weights
    if rank == 0:
        torch.save(result, out_path)
    del keep_alive


if __name__ == "__main__":
    if sys.argv[1] == "grads":
        grads_main(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
