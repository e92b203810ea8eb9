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
the logits. After each step, :meth:`named_weights` streams the full weights to the policy, one
bucket of ZeRO-3 parameters gathered at a time.
"""

from __future__ import annotations

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
    MetricAccumulator,
    TorchLearner,
    TrainBatch,
    enable_gradient_checkpointing,
    export_state,
    hf_model,
    logprob_model,
    lora_scalings,
    lr_lambda,
    make_optimizer,
    micro_batches,
    micro_weight,
)


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


def deepspeed_config(cfg: RunConfig, device: torch.device | None = None) -> dict:
    """The engine's config from ``trainer.*``. Offloading the optimizer: on a GPU DeepSpeed's own
    CPU Adam (``optimizer`` here; a torch optimizer stepping the offloaded fp32 master weights
    would be slow); on the CPU the torch optimizer itself, which DeepSpeed refuses with offload
    unless ``zero_force_ds_cpu_optimizer`` is off (its CPU Adam is a compiled op)."""
    ds = cfg.trainer.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params and ds.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    config: dict = {
        "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
        "gradient_accumulation_steps": 1,  # accumulation boundaries are set per mini-batch
        "gradient_clipping": cfg.trainer.grad_clip,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if uses_ds_cpu_adam(cfg, device):
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.trainer.lr,
                "betas": list(cfg.trainer.betas),
                "weight_decay": cfg.trainer.weight_decay,
            },
        }
    elif ds.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False
    if cfg.trainer.optimizer == "sgd":
        config["zero_allow_untested_optimizer"] = True  # torch SGD: ZeRO only partitions its state
    return config


def uses_ds_cpu_adam(cfg: RunConfig, device: torch.device | None) -> bool:
    """Whether the engine builds DeepSpeed's CPU Adam for the offloaded master weights
    (``trainer.deepspeed.offload_adam``): by default on a GPU machine only; ``deepspeed``
    forces it on the CPU too (the op is JIT-compiled there, about a minute once), which is how
    the CPU tests check that branch against torch AdamW."""
    ds = cfg.trainer.deepspeed
    if not ds.offload_optimizer or cfg.trainer.optimizer != "adamw" or ds.offload_adam == "torch":
        return False
    if ds.offload_adam == "deepspeed":
        return True
    return device is not None and device.type == "cuda"


def zero3_construction(cfg: RunConfig):
    """Under ZeRO-3, transformers' DeepSpeed integration (``HfDeepSpeedConfig``) so that a model
    loaded while the returned object lives is built inside ``deepspeed.zero.Init``: each rank
    allocates only its partition, in the engine's dtype (bf16 with ``model.dtype: bfloat16``),
    instead of a full fp32 copy. None for stages 1 and 2. Keep the object alive as long as the
    model (transformers consults it through a weak reference); call after
    :func:`init_distributed`."""
    if cfg.trainer.learner != "deepspeed" or cfg.trainer.deepspeed.zero_stage != 3:
        return None
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config(cfg))


def is_partitioned(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are ZeRO-3 partitions (built under ``zero.Init``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


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
        world = torch.distributed.get_world_size()
        if cfg.trainer.deepspeed.zero_stage == 3 and cfg.policy.backend == "hf" and world > 1:
            # the hf policy generates with the learner's own (partitioned) module: every
            # generated token would be a collective gather, and ranks stop at different lengths
            raise ValueError(
                f"trainer.deepspeed.zero_stage=3 with policy.backend='hf' on {world} ranks: "
                "use policy.backend=vllm (weights are exported to it), or zero_stage 1 or 2"
            )
        self.cfg = cfg
        self.device = device
        # a model built under zero.Init (zero3_construction) is already partitioned in the
        # engine's dtype; anything else arrives whole and the engine casts (bf16) or partitions it
        self.lm = lm if is_partitioned(lm) else lm.to(device=device, dtype=torch.float32)
        enable_gradient_checkpointing(self.lm, cfg)
        # the bf16 engine casts the module; the FP32 path upcasts inside the head, no autocast
        self.module = logprob_model(self.lm, cfg, None)
        # objective.kl_coef's frozen reference: a full copy per rank (ZeRO-1/2; the config
        # refuses ZeRO-3), in the weights' dtype and outside the engine
        bf16 = cfg.model.dtype == "bfloat16"
        self.reference = self._reference(reference, torch.bfloat16 if bf16 else torch.float32, None)
        if cfg.trainer.deepspeed.zero_stage == 3:
            deepspeed.zero.register_external_parameter(
                self.module, hf_model(self.lm).get_output_embeddings().weight
            )
        params = [p for p in self.module.parameters() if p.requires_grad]
        schedule = lr_lambda(cfg, total_updates)
        if uses_ds_cpu_adam(cfg, device):
            optimizer = None  # the config's: DeepSpeed's CPU Adam on the offloaded master weights
            scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # noqa: E731
        else:
            optimizer = make_optimizer(params, cfg)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module,
            model_parameters=params if optimizer is None else None,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, device),
        )
        self.forward = self.engine  # logprobs() and the loss run through the engine

    def _plan(self, batch: TrainBatch) -> tuple[list[TrainBatch], int]:
        """This rank's micro-batches and the number every rank runs (the most any rank has):
        ZeRO-2 reduces gradients in every backward and ZeRO-3 gathers parameters in every
        forward, so a rank running fewer passes than another would leave it waiting."""
        micros = list(micro_batches(batch, self.cfg.trainer.micro_batch_size))
        count = int(all_reduce(torch.tensor([float(len(micros))]), "max").item())
        return micros, count

    def logprobs(self, batch: TrainBatch) -> tuple[Tensor, Tensor]:
        """Old log-probs, with as many forwards on every rank (ZeRO-3 gathers in each); an
        empty batch gives [0, T] tensors."""
        self.forward.eval()
        micros, count = self._plan(batch)
        outs = []
        with torch.no_grad():
            for index in range(count):
                micro = micros[index] if index < len(micros) else None
                run = (micro or _filler(micros)).to(self.device)
                out = self.forward(run.input_ids, run.attention_mask, run.target_ids, run.loss_mask)
                if micro is not None:
                    outs.append(out)
        if not outs:
            empty = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
            return empty, empty.clone()
        logprobs = torch.cat([o[0] for o in outs]).float().cpu()
        return logprobs, torch.cat([o[1] for o in outs]).float().cpu()

    def accumulate(self, batch: TrainBatch, zeta: float, eps_high: float) -> dict[str, float]:
        """Forward/backward of this rank's share of the mini-batch; the gradients are reduced
        over the ranks (no step yet).

        Ranks may hold different numbers of rows and tokens (after the LOOP and overlong
        filters), or none. Two things make that exact: the rank's loss is weighted by its share
        of the global batch (tokens for ``token_mean``, rows otherwise), so the gradient
        DeepSpeed averages over ranks is the global batch's, not the mean of per-rank means;
        and every rank runs the same number of forward/backward passes (:meth:`_plan`), a rank
        with fewer padding with zero-weight ones (the loss times 0: an exact zero gradient
        whatever the objective's terms). ``loss/total`` is the global batch's loss on every
        rank; a rank without rows reports its metrics' keys with zeros (``*/max``: -inf), so
        every rank reports the same keys and a token-weighted reduce leaves it out."""
        self.forward.train()
        metrics = MetricAccumulator()
        total_loss = 0.0
        micros, count = self._plan(batch)
        aggregation = self.cfg.objective.aggregation
        local = float(batch.loss_mask.sum()) if aggregation == "token_mean" else float(len(batch))
        total = float(all_reduce(torch.tensor([local], dtype=torch.float64), "sum").item())
        world = torch.distributed.get_world_size() if is_distributed() else 1
        # the rank's share relative to an even split: 1 when every rank holds the same amount
        share = local * world / max(total, 1.0)
        keys: dict[str, float] = {}
        for index in range(count):
            self.engine.set_gradient_accumulation_boundary(index == count - 1)
            padding = index >= len(micros)
            micro = _filler(micros) if padding else micros[index]
            weight = 0.0 if padding else micro_weight(micro, batch, aggregation) * share
            loss, m = self._micro_loss(micro.to(self.device), zeta, eps_high)
            self.engine.backward(loss * weight, scale_wrt_gas=False)
            keys = m
            if not padding:
                total_loss += float(loss.detach()) * weight
                metrics.add(m, float(micro.loss_mask.sum()))
        out = metrics.result()
        if not micros:
            out = {k: (-math.inf if k.endswith("/max") else 0.0) for k in keys}
        # the ranks' share-weighted losses sum to world x the global batch's loss
        summed = all_reduce(torch.tensor([total_loss], dtype=torch.float64), "sum").item()
        out["loss/total"] = float(summed) / world
        return out

    def update(self, batch: TrainBatch, zeta: float, eps_high: float) -> dict[str, float]:
        """One optimizer step over this rank's share of the mini-batch (:meth:`accumulate`),
        skipped on every rank together when any rank's loss or gradients are not finite. A
        mini-batch part empty on every rank (fewer rows than ``trainer.mini_batches``) makes no
        step anywhere."""
        if not any_rank(len(batch) > 0):
            return {"loss/total": 0.0, "nonfinite": 0.0}
        return self.finish(self.accumulate(batch, zeta, eps_high))

    def finish(self, out: dict[str, float]) -> dict[str, float]:
        """The step after :meth:`accumulate` (every rank calls it, with its own ``out``)."""
        grad_norm = self.engine.get_global_grad_norm()
        out["grad/norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        out["optim/lr"] = self.scheduler.get_last_lr()[0]
        # one decision for all ranks: a rank that skipped the step alone would leave the others
        # waiting in the step's collectives
        local_bad = not (math.isfinite(out["loss/total"]) and _local_grads_finite(self.module))
        if any_rank(local_bad):
            self.engine.zero_grad()
            out["nonfinite"] = 1.0
            return out
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        out["grad/norm"] = float(grad_norm) if grad_norm is not None else out["grad/norm"]
        out["nonfinite"] = 0.0 if math.isfinite(out["grad/norm"]) else 1.0
        return out

    def named_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        """Full weights with HF names, streamed: under ZeRO-3 one bucket of whole modules
        (``trainer.deepspeed.export_bucket_numel`` elements, or one larger module) is gathered
        at a time, copied in ``dtype`` (the sampler's; None: as held), yielded and released
        before the next, so the export's extra memory is about one bucket, not the model.
        With LoRA a bucket holds whole adapted layers and yields their merged base weights
        under the base names. Every rank must drain the iterator (the gathers are collective).
        """
        yield from stream_weights(self.lm, dtype, self.cfg.trainer.deepspeed.export_bucket_numel)

    def save_state(self, folder: Path) -> None:
        """The engine's own (partitioned) optimizer/scheduler state; every rank must call it."""
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")

    def load_state(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")


def _filler(micros: list[TrainBatch]) -> TrainBatch:
    """What a padding pass runs: the rank's first micro-batch, or, for a rank without rows, one
    row of one token (finite loss; its weight 0 makes its gradient exactly 0)."""
    if micros:
        return micros[0]
    one = torch.ones(1, 1)
    return TrainBatch(
        input_ids=torch.zeros(1, 1, dtype=torch.long),
        attention_mask=torch.ones(1, 1, dtype=torch.long),
        target_ids=torch.zeros(1, 1, dtype=torch.long),
        loss_mask=one,
        sampler_logprobs=torch.zeros(1, 1),
        advantages=torch.zeros(1),
    )


def empty_batch(width: int = 1) -> TrainBatch:
    """A batch of 0 rows: a rank whose episodes were all filtered out or errored still joins
    the update's collectives with it (:meth:`DeepSpeedLearner.accumulate`)."""
    return TrainBatch(
        input_ids=torch.zeros(0, width, dtype=torch.long),
        attention_mask=torch.zeros(0, width, dtype=torch.long),
        target_ids=torch.zeros(0, width, dtype=torch.long),
        loss_mask=torch.zeros(0, width),
        sampler_logprobs=torch.zeros(0, width),
        advantages=torch.zeros(0),
    )


def _export_groups(lm: nn.Module, bucket_numel: int) -> list[list[str]]:
    """``lm``'s state-dict keys in buckets of whole modules (a LoRA layer's base weight and
    adapters together), each of at most ``bucket_numel`` elements unless one module is larger."""
    state = lm.state_dict(keep_vars=True)  # parameters as they are: no gather, no copy
    units: dict[str, list[str]] = {}
    for key in state:
        if ".base_layer." in key:
            unit = key.rsplit(".base_layer.", 1)[0]
        elif ".lora_" in key:
            unit = key.rsplit(".lora_", 1)[0]
        else:
            unit = key.rsplit(".", 1)[0]
        units.setdefault(unit, []).append(key)
    buckets: list[list[str]] = []
    size = 0
    for keys in units.values():
        numel = sum(_full_numel(state[k]) for k in keys)
        if buckets and size + numel <= bucket_numel:
            buckets[-1].extend(keys)
            size += numel
        else:
            buckets.append(list(keys))
            size = numel
    return buckets


def _full_numel(tensor: Tensor) -> int:
    return int(getattr(tensor, "ds_numel", tensor.numel()))


def stream_weights(
    lm: nn.Module, dtype: torch.dtype | None, bucket_numel: int
) -> Iterator[tuple[str, Tensor]]:
    """(HF name, full tensor) pairs of ``lm``, a bucket at a time (:func:`_export_groups`):
    ZeRO-3 partitions are gathered for the bucket only, copied (in ``dtype`` when given) and
    released before the next bucket is gathered."""
    import deepspeed

    state = lm.state_dict(keep_vars=True)
    scalings = lora_scalings(lm)
    for keys in _export_groups(lm, bucket_numel):
        tensors = {k: state[k] for k in keys}
        params = [t for t in tensors.values() if hasattr(t, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            part = {k: t.detach() for k, t in tensors.items()}
            exported = export_state(lm, part, scalings)
            copies = {
                name: t.to(dtype=dtype or t.dtype, device="cpu", copy=True)
                for name, t in exported.items()
            }
        del part, exported
        yield from copies.items()
        del copies


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
