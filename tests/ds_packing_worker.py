"""One DeepSpeed ZeRO-2 (or ``stage``) step with the shared-prefix and packed forward on, run by
tests/test_trainer_packing_deepspeed.py under torchrun with 2 gloo processes on CPU. Rank r
takes group r of the batch (so its micro-batch shares a prompt); rank 0 writes the global loss,
the gradient norm, sums of the updated weights and what the forward's layout did to JSON."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ADVANTAGES = [1.0, -0.5, 0.25, -1.0, 0.5, -0.25, 1.5, -1.5]
GROUPS, K = 2, 4


def packing_batch(vocab: int):
    from test_trainer_packing import group_episodes

    from trainer.learner import collate

    episodes = group_episodes(vocab, groups=GROUPS, k=K, seed=11)
    return collate(episodes, torch.tensor(ADVANTAGES), pad_id=0)


def main(model_dir: str, out: str, stage: str = "2") -> None:
    from agent.models import load_model
    from trainer.config import load_config
    from trainer.deepspeed_learner import DeepSpeedLearner

    cfg = load_config(
        None,
        [
            f"model.name={model_dir}",
            "trainer.learner=deepspeed",
            "trainer.device=cpu",
            f"trainer.deepspeed.zero_stage={stage}",
            "policy.backend=vllm",  # (not started here) ZeRO-3 on 2 ranks refuses the hf policy
            "trainer.lr=1e-3",
            f"trainer.micro_batch_size={K}",
            "trainer.shared_prefix=on",
            "trainer.packing=on",
            "precision.chunk_size=5",
        ],
    )
    learner = DeepSpeedLearner(load_model(model_dir), cfg, torch.device("cpu"), total_updates=1)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    batch = packing_batch(learner.lm.config.vocab_size)
    shard = batch.rows(list(range(rank * K, (rank + 1) * K)))
    shard.old_logprobs, _ = learner.logprobs(shard)
    metrics = learner.update(shard, zeta=0.0, eps_high=0.28)
    layout = dict(learner.module.last_layout)
    loss = torch.tensor([metrics["loss/total"]], dtype=torch.float64)
    torch.distributed.all_reduce(loss)
    shared = torch.tensor([float(layout["shared"])])
    torch.distributed.all_reduce(shared)
    weights = dict(learner.named_weights())
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "world": world,
                    "loss": float(loss) / world,
                    "grad_norm": metrics["grad/norm"],
                    "layout": layout["layout"],
                    "shared_total": float(shared),
                    "weights": {k: v.double().sum().item() for k, v in weights.items()},
                }
            )
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
