"""What the DeepSpeed tests run on 2 gloo ranks under torchrun (CPU), one mode per argv[1]:

- (default, tests/test_trainer_deepspeed.py) one learner step on a fixed batch, rank r taking
  rows r::world; rank 0 writes the loss (averaged over ranks), the updated weights' sums and
  precision checks to JSON;
- ``grads`` (tests/test_trainer_ds_grads.py, test_trainer_ds_cpu_adam.py): full gradients,
  weights and log-probs over three steps on even, uneven and empty ranks (:func:`grads_main`);
- ``train`` (tests/test_trainer_distributed.py): ``eprl train``, each rank saving its weights
  and kept-episode counts (:func:`train_main`).

It also registers the test environments those runs train on."""

import json
import sys
from pathlib import Path

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


class HalfLearnableEnv(gymnasium.Env):
    """Two training tasks. ``learnable``: the reward is the share of lowercase letters in the
    reply (``DigitRewardEnv``'s dense signal). ``impossible``: the reply must be a 40-digit
    number the prompt never states, which the tiny model never writes: every reward 0, every
    advantage 0, so the LOOP ``|A|`` filter drops the whole group. With 2 tasks per step on 2
    ranks each rank rolls out one of them: in every step one rank keeps no episode."""

    observation_space = gymnasium.spaces.Text(max_length=100)
    action_space = gymnasium.spaces.Text(max_length=10_000)
    SECRET = "3141592653589793238462643383279502884197"

    def __init__(self):
        self.splits = ["train", "dev"]

    def task_ids(self, split):
        return ["learnable", "impossible"] if split == "train" else ["dev-0"]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.task = (options or {}).get("task_id", "learnable")
        prompt = "Say some letters." if self.task != "impossible" else "The secret number?"
        return prompt, {"task_id": self.task, "turn": 0}

    def step(self, action):
        if self.task == "impossible":
            reward = float(action.strip() == self.SECRET)
        else:
            reward = sum("a" <= c <= "z" for c in action) / max(len(action), 1)
        info = {"task_id": self.task, "turn": 1, "success": reward > 0.5}
        return "", reward, True, False, {**info, "tests_passed": 0, "tests_total": 0}


HALF_LEARNABLE_ENV = "ds_worker:eprl-test/DsHalfLearnable-v0"
if "eprl-test/DsHalfLearnable-v0" not in gymnasium.registry:
    gymnasium.register(
        "eprl-test/DsHalfLearnable-v0", entry_point=HalfLearnableEnv, disable_env_checker=True
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
# AdamW with every hyperparameter away from its default, so a knob the engine dropped shows
ADAMW_OVERRIDES = [
    "trainer.optimizer=adamw",
    "trainer.lr=1e-3",
    "trainer.betas=[0.8,0.95]",
    "trainer.weight_decay=0.1",
    "trainer.micro_batch_size=1",
]


def learner_overrides(flags: set[str]) -> list[str]:
    """The optimizer (and LoRA) overrides shared by the 2-rank worker and the torch reference:
    plain SGD, or AdamW with ``adamw``; LoRA adapters with ``lora``."""
    return [
        *(ADAMW_OVERRIDES if "adamw" in flags else GRAD_OVERRIDES),
        *(LORA_OVERRIDES if "lora" in flags else []),
    ]


def grads_main(model_dir: str, out_path: str, zero_stage: str, options: str = "") -> None:
    """The DeepSpeed learner's full gradients (``safe_get_full_grad``, reduced over ranks,
    before the step) and losses for each of :data:`SCENARIOS`, the weights after them, the
    streamed export and the learner's log-probs of the whole batch after the steps;
    ``options`` (comma-separated): ``init`` builds the model partitioned under zero.Init
    (transformers' ZeRO-3 integration), ``offload`` offloads the optimizer, ``bf16`` runs bf16
    weights, ``lora`` adds LoRA adapters (seeded as :func:`lora_model`), ``adamw`` steps AdamW
    instead of SGD, ``dsadam`` forces DeepSpeed's CPU Adam on the offloaded master weights
    (``trainer.deepspeed.offload_adam=deepspeed``); rank 0 writes everything with torch.save."""
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
    from trainer.learner import apply_lora

    flags = set(filter(None, options.split(",")))
    cfg = load_config(
        None,
        [
            f"model.name={model_dir}",
            "trainer.learner=deepspeed",
            "trainer.device=cpu",
            f"trainer.deepspeed.zero_stage={zero_stage}",
            f"trainer.deepspeed.offload_optimizer={'offload' in flags}",
            *(["trainer.deepspeed.offload_adam=deepspeed"] if "dsadam" in flags else []),
            "trainer.deepspeed.export_bucket_numel=20000",  # many buckets on the tiny model
            f"model.dtype={'bfloat16' if 'bf16' in flags else 'float32'}",
            "policy.backend=vllm",  # (not started here) ZeRO-3 on 2 ranks refuses the hf policy
            *learner_overrides(flags),
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
    if "lora" in flags:
        torch.manual_seed(0)  # the adapters' initialisation, as lora_model() does
        lm = apply_lora(lm, cfg.trainer.lora)
    learner = DeepSpeedLearner(lm, cfg, torch.device("cpu"), total_updates=len(SCENARIOS))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    batch = fixed_batch(learner.lm.config.vocab_size, uneven=True)
    result: dict = {"world": world, "built": built, "scenarios": {}}
    result["optimizer"] = type(learner.engine.basic_optimizer).__name__
    for name, shards in SCENARIOS.items():
        rows = shards[rank]
        shard = batch.rows(rows) if rows else empty_batch(batch.input_ids.shape[1])
        shard.old_logprobs, _ = learner.logprobs(shard)
        assert shard.old_logprobs.shape == shard.input_ids.shape
        out = learner.accumulate(shard, zeta=0.0, eps_high=0.28)
        grads = {
            key: safe_get_full_grad(param).detach().float().clone()
            for key, param in learner.lm.named_parameters()
            if param.requires_grad  # LoRA: the frozen base weights have none
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
    # the learner's own log-probs of the whole batch after the steps (every rank runs them)
    result["logprobs"] = learner.logprobs(batch)[0]
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


def train_main(out_dir: str, config: str, *overrides: str) -> None:
    """``eprl train CONFIG OVERRIDES`` (the CLI, in-process) on every rank; then each rank saves
    its learner's weights and, per step, how many episodes it kept to ``out_dir``. Two
    wrappers record them around the real functions: :func:`trainer.loop.run_training` (its
    trainer) and :func:`trainer.episodes.select_episodes` (its selection); nothing else is
    replaced."""
    import eprl
    import trainer.loop as loop

    kept: list[int] = []
    trainers: list = []
    select, run_training = loop.select_episodes, loop.run_training

    def recording_select(*args, **kwargs):
        chosen = select(*args, **kwargs)
        kept.append(len(chosen.kept))
        return chosen

    def recording_run(*args, **kwargs):
        trainers.append(run_training(*args, **kwargs))
        return trainers[-1]

    loop.select_episodes, loop.run_training = recording_select, recording_run
    eprl.app(["train", config, *overrides], standalone_mode=False)
    (trainer,) = trainers
    weights = {key: tensor.clone() for key, tensor in trainer.learner.named_weights()}
    out = Path(out_dir) / f"rank{trainer.rank}.pt"
    torch.save({"weights": weights, "kept": kept, "world": trainer.world}, out)


if __name__ == "__main__":
    if sys.argv[1] == "grads":
        grads_main(*sys.argv[2:])
    elif sys.argv[1] == "train":
        train_main(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
