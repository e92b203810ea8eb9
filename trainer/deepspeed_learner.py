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
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from trainer.config import RunConfig
from trainer.learner import (
    LogprobModel,
    MetricAccumulator,
    TorchLearner,
    TrainBatch,
    lr_lambda,
    micro_batches,
    micro_weight,
)
from trainer.precision import loss_compute_dtype


def init_distributed(device: torch.device) -> None:
    """Initialise torch.distributed for DeepSpeed (nccl on GPU, gloo on CPU).

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
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


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

        init_distributed(device)
        self.cfg = cfg
        self.device = device
        self.lm = lm.to(device=device, dtype=torch.float32)
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
        self.forward.train()
        metrics = MetricAccumulator()
        total_loss = 0.0
        micros = list(micro_batches(batch, self.cfg.trainer.micro_batch_size))
        for index, micro in enumerate(micros):
            self.engine.set_gradient_accumulation_boundary(index == len(micros) - 1)
            weight = micro_weight(micro, batch, self.cfg.objective.aggregation)
            loss, m = self._micro_loss(micro.to(self.device), zeta, eps_high)
            self.engine.backward(loss * weight, scale_wrt_gas=False)
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
        finite = math.isfinite(total_loss)
        if not finite:
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
        yield from state.items()

    def save_state(self, folder: Path) -> None:
        """The engine's own (partitioned) optimizer/scheduler state; every rank must call it."""
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")

    def load_state(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
