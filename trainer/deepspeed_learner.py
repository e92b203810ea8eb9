"""The DeepSpeed learner: ZeRO stage 1/2/3 data parallel, bf16 weights with fp32 master weights.

Launch with DeepSpeed's own launcher or torchrun, one process per GPU (``gloo`` on CPU, so CI
runs it for real with two processes)::

    deepspeed --num_gpus 8 -m eprl train configs/appworld_qwen_repo.yaml trainer.learner=deepspeed
    torchrun --nproc_per_node 2 -m eprl train CONFIG trainer.learner=deepspeed trainer.device=cpu

Every rank rolls out its own shard of the step's tasks, the learner all-reduces gradients, and
rank 0 writes logs and checkpoints. The engine wraps :class:`trainer.learner.LogprobModel`, so
the LM head runs inside the engine's forward: under ZeRO-3 the (tied) head weight is registered
as an external parameter of that module and gathered for it, and the FP32 loss path upcasts
hidden states and head weight before the projection, so DeepSpeed's bf16 casting never reaches
the logits. After each step, :meth:`named_weights` gathers full weights (ZeRO-3) for the policy.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from trainer.config import RunConfig
from trainer.distributed import all_reduce, any_rank, is_distributed
from trainer.learner import (
    LogprobModel,
    MetricAccumulator,
    TorchLearner,
    TrainBatch,
    enable_gradient_checkpointing,
    export_state,
    lr_lambda,
    micro_batches,
    micro_weight,
)
from trainer.precision import loss_compute_dtype


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> None:
    """Initialise torch.distributed for DeepSpeed (nccl on GPU, gloo on CPU), with collectives
    that give up after ``timeout_s`` (``trainer.deepspeed.timeout_s``).

    A single process started without a launcher gets a one-process group on loopback (DeepSpeed
    would otherwise try MPI discovery)."""
    import deepspeed

    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29531"),
    ):
        os.environ.setdefault(key, value)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )


def deepspeed_config(cfg: RunConfig) -> dict:
    ds = cfg.trainer.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params and ds.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
        "gradient_accumulation_steps": 1,  # accumulation boundaries are set per mini-batch
        "gradient_clipping": cfg.trainer.grad_clip,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedLearner(TorchLearner):
    """Same interface as :class:`TorchLearner`; the engine owns optimizer, clipping, scaling."""

    def __init__(
        self,
        lm: nn.Module,
        cfg: RunConfig,
        device: torch.device,
        total_updates: int,
        reference: nn.Module | None = None,
    ) -> None:
        import deepspeed

        init_distributed(device, cfg.trainer.deepspeed.timeout_s)
        self.cfg = cfg
        self.device = device
        self.lm = lm.to(device=device, dtype=torch.float32)
        enable_gradient_checkpointing(self.lm, cfg)
        # the bf16 engine casts the module; the FP32 path upcasts inside the head, no autocast
        self.module = LogprobModel(
            self.lm,
            loss_compute_dtype(cfg.precision),
            cfg.precision.chunk_size,
            None,
            cfg.policy.temperature,
        )
        # objective.kl_coef's frozen reference: a full copy per rank (ZeRO-1/2; the config
        # refuses ZeRO-3), in the weights' dtype and outside the engine
        bf16 = cfg.model.dtype == "bfloat16"
        self.reference = self._reference(reference, torch.bfloat16 if bf16 else torch.float32, None)
        if cfg.trainer.deepspeed.zero_stage == 3:
            deepspeed.zero.register_external_parameter(
                self.module, self.lm.get_output_embeddings().weight
            )
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.trainer.lr,
            betas=tuple(cfg.trainer.betas),
            weight_decay=cfg.trainer.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda=lr_lambda(cfg, total_updates)
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg),
        )
        self.forward = self.engine  # logprobs() and the loss run through the engine

    def update(self, batch: TrainBatch, zeta: float, eps_high: float) -> dict[str, float]:
        """One optimizer step over this rank's share of the mini-batch.

        Ranks may hold different numbers of rows and tokens (after the LOOP and overlong
        filters). Two things make that exact: the rank's loss is weighted by its share of the
        global batch (tokens for ``token_mean``, rows otherwise), so the gradient DeepSpeed
        averages over ranks is the global batch's, not the mean of per-rank means; and every
        rank runs the same number of forward/backward passes (ZeRO-2 reduces gradients in each
        backward, ZeRO-3 gathers parameters in each forward: unequal counts hang), a rank with
        fewer micro-batches padding with zero-weight ones (the loss times 0: an exact zero
        gradient whatever the objective's terms)."""
        self.forward.train()
        metrics = MetricAccumulator()
        total_loss = 0.0
        micros = list(micro_batches(batch, self.cfg.trainer.micro_batch_size))
        if not micros:
            raise ValueError("a DeepSpeed update needs at least one row on every rank")
        aggregation = self.cfg.objective.aggregation
        local = float(batch.loss_mask.sum()) if aggregation == "token_mean" else float(len(batch))
        total = float(all_reduce(torch.tensor([local], dtype=torch.float64), "sum").item())
        count = int(all_reduce(torch.tensor([float(len(micros))]), "max").item())
        world = torch.distributed.get_world_size() if is_distributed() else 1
        # the rank's share relative to an even split: 1 when every rank holds the same amount
        share = local * world / max(total, 1.0)
        for index in range(count):
            self.engine.set_gradient_accumulation_boundary(index == count - 1)
            padding = index >= len(micros)
            micro = micros[0] if padding else micros[index]
            weight = 0.0 if padding else micro_weight(micro, batch, aggregation) * share
            loss, m = self._micro_loss(micro.to(self.device), zeta, eps_high)
            self.engine.backward(loss * weight, scale_wrt_gas=False)
            if not padding:
                total_loss += float(loss.detach()) * weight
                metrics.add(m, float(micro.loss_mask.sum()))
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        out = metrics.result()
        out.update(
            {
                "loss/total": total_loss,
                "grad/norm": grad_norm,
                "optim/lr": self.scheduler.get_last_lr()[0],
            }
        )
        # one decision for all ranks: a rank that skipped the step alone would leave the others
        # waiting in the step's collectives
        local_bad = not (math.isfinite(total_loss) and _local_grads_finite(self.module))
        if any_rank(local_bad):
            self.engine.zero_grad()
            out["nonfinite"] = 1.0
            return out
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        out["grad/norm"] = float(grad_norm) if grad_norm is not None else out["grad/norm"]
        out["nonfinite"] = 0.0 if math.isfinite(out["grad/norm"]) else 1.0
        return out

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """Full-precision full weights with HF names (gathered under ZeRO-3), on every rank."""
        import deepspeed

        params = list(self.lm.parameters())
        gather = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if self.cfg.trainer.deepspeed.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            state = {name: t.detach().float().clone() for name, t in self.lm.state_dict().items()}
        yield from export_state(self.lm, state).items()

    def save_state(self, folder: Path) -> None:
        """The engine's own (partitioned) optimizer/scheduler state; every rank must call it."""
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")

    def load_state(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")


def _local_grads_finite(module: nn.Module) -> bool:
    """Whether the gradients this rank holds are finite, checked before ``engine.step()``.

    Under ZeRO-1 the full gradients sit in ``.grad``; under ZeRO-2/3 DeepSpeed moves each rank's
    partition into its own buffers and ``.grad`` may be None. The loss's finiteness (checked
    beside this) covers what this misses, and the engine's grad norm after the step is checked
    too."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return True
    # one device sync for all tensors (a norm is non-finite iff an entry is), not one per tensor
    return bool(torch.isfinite(torch.stack([g.float().norm() for g in grads])).all())
