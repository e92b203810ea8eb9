"""Learners: turn episodes into an optimizer step on the policy.

Two backends share everything but the optimizer plumbing:

* :class:`TorchLearner` — one process on CPU or one GPU. Weights are kept in float32 (the master
  copy); ``model.dtype: bfloat16`` runs the transformer body under bf16 autocast, which is how
  bf16 training with fp32 master weights looks in plain torch.
* :class:`DeepSpeedLearner` (``trainer.deepspeed_learner``) — ZeRO 1/2/3 across GPUs and nodes.

Both call :class:`LogprobModel`, which computes log-probs and entropies through the FP32 loss
path (``trainer.precision``): the LM head's projection, log-softmax and entropy run in float32
whatever the weights' or autocast's dtype, so framework casting never reaches the logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from trainer.config import LoraConfig, RunConfig
from trainer.objectives import LossInputs, policy_loss
from trainer.packing import check_mode, plan_layout
from trainer.precision import loss_compute_dtype, token_logprobs_and_entropy


@dataclass
class TrainBatch:
    """Episodes right-padded to [B, T]; position t predicts ``target_ids[:, t]``."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    target_ids: Tensor  # [B, T]
    loss_mask: Tensor  # [B, T] 1 on sampled target tokens
    sampler_logprobs: Tensor  # [B, T]
    advantages: Tensor  # [B]
    old_logprobs: Tensor | None = None  # [B, T], filled by the learner or from the sampler

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: Sequence[int] | slice) -> TrainBatch:
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return TrainBatch(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(
            *(
                None if (t := getattr(self, f)) is None else t.to(device)
                for f in self.__dataclass_fields__
            )
        )


def collate(episodes, advantages: Tensor, pad_id: int) -> TrainBatch:
    """Pad episodes (``agent.rollout.Episode``) into a :class:`TrainBatch`."""
    if len(episodes) != advantages.shape[0]:
        raise ValueError(f"{len(episodes)} episodes but {advantages.shape[0]} advantages")
    width = max(len(ep.token_ids) for ep in episodes) - 1
    batch = len(episodes)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    target_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    loss_mask = torch.zeros((batch, width), dtype=torch.float32)
    sampler = torch.zeros((batch, width), dtype=torch.float32)
    for row, ep in enumerate(episodes):
        n = len(ep.token_ids) - 1
        ids = torch.tensor(ep.token_ids, dtype=torch.long)
        input_ids[row, :n] = ids[:-1]
        target_ids[row, :n] = ids[1:]
        attention[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(ep.loss_mask[1:], dtype=torch.float32)
        sampler[row, :n] = torch.tensor(ep.sampler_logprobs[1:], dtype=torch.float32)
    return TrainBatch(input_ids, attention, target_ids, loss_mask, sampler, advantages.float())


class LogprobModel(nn.Module):
    """A causal LM whose forward returns (log-probs of targets, entropies), both [B, T], via the
    FP32 loss path. Wrapping the LM this way lets DeepSpeed's engine own one module whose
    forward covers the head, so ZeRO-3 gathers the (tied) head weight for it."""

    def __init__(
        self,
        lm: nn.Module,
        compute_dtype: torch.dtype = torch.float32,
        chunk_size: int = 1024,
        autocast_dtype: torch.dtype | None = None,
        temperature: float = 1.0,
        shared_prefix: str = "auto",
        packing: str = "auto",
    ) -> None:
        super().__init__()
        check_mode("trainer.shared_prefix", shared_prefix)
        check_mode("trainer.packing", packing)
        self.lm = lm
        self.compute_dtype = compute_dtype
        self.chunk_size = chunk_size
        self.autocast_dtype = autocast_dtype
        self.temperature = temperature if temperature > 0 else 1.0
        self.shared_prefix = shared_prefix
        self.packing = packing
        # what the last forward did: layout (padded/packed), positions computed, shared ones
        self.last_layout: dict[str, int | str] = {}

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        target_ids: Tensor,
        loss_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(log-probs, entropies) [B, T] of ``target_ids``.

        The head runs only where the values are used: on ``loss_mask``'s tokens when it is given
        (the loss reads nothing else), else on every attended position; the rest is 0. The body
        runs on the padded batch or, where ``trainer.shared_prefix`` / ``trainer.packing`` apply,
        on a :class:`trainer.packing.PackedLayout` of it (each prompt once, no padding): the
        hidden state of every used position is the padded forward's either way."""
        causal_lm = hf_model(self.lm)
        body = causal_lm.base_model  # the transformer without its head (LlamaModel, ...)
        head = causal_lm.get_output_embeddings()
        attention = getattr(causal_lm.config, "_attn_implementation", None) or "eager"
        layout = plan_layout(
            input_ids,
            attention_mask,
            shared_prefix=self.shared_prefix,
            packing=self.packing,
            attention=attention,
            hidden_size=int(getattr(causal_lm.config, "hidden_size", 1024)),
        )
        if layout is None:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            source = torch.arange(input_ids.numel(), device=input_ids.device).view_as(input_ids)
            self.last_layout = {"layout": "padded", "positions": input_ids.numel(), "shared": 0}
        else:
            inputs = layout.model_inputs(attention)
            source = layout.source
            self.last_layout = {
                "layout": "varlen" if layout.varlen else "packed",
                "positions": layout.packed_positions,
                "shared": layout.shared_tokens,
            }
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=input_ids.device.type, dtype=self.autocast_dtype):
                hidden = body(**inputs).last_hidden_state
        else:
            hidden = body(**inputs).last_hidden_state
        used = attention_mask.bool()
        if loss_mask is not None:
            used = used & (loss_mask > 0)
        # the gather's backward adds up the gradients of positions used by several rows (a
        # shared prompt's last token predicts each row's first answer token)
        picked = hidden.reshape(-1, hidden.shape[-1])[source[used]]
        logprobs, entropy = token_logprobs_and_entropy(
            picked,
            head.weight,
            target_ids[used],
            getattr(head, "bias", None),
            chunk_size=self.chunk_size,
            compute_dtype=self.compute_dtype,
            temperature=self.temperature,
        )
        zeros = torch.zeros(input_ids.shape, dtype=logprobs.dtype, device=logprobs.device)
        return zeros.masked_scatter(used, logprobs), zeros.masked_scatter(used, entropy)


def logprob_model(
    lm: nn.Module, cfg: RunConfig, autocast_dtype: torch.dtype | None
) -> LogprobModel:
    """``lm`` as every learner computes with it (the trained module and the KL reference, in
    either learner): the run's loss dtype, chunk size, sampling temperature and forward layout,
    so that no learner can score tokens differently from another."""
    return LogprobModel(
        lm,
        loss_compute_dtype(cfg.precision),
        cfg.precision.chunk_size,
        autocast_dtype,
        cfg.policy.temperature,
        shared_prefix=cfg.trainer.shared_prefix,
        packing=cfg.trainer.packing,
    )


def micro_batches(batch: TrainBatch, size: int) -> Iterator[TrainBatch]:
    for start in range(0, len(batch), size):
        yield batch.rows(slice(start, start + size))


class MetricAccumulator:
    """Token-weighted means of per-micro-batch metrics; maxima for */max."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, metrics: dict[str, float], weight: float) -> None:
        self.weight += weight
        for key, value in metrics.items():
            if key.endswith("/max"):
                self.sums[key] = max(self.sums.get(key, -math.inf), value)
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value * weight

    def result(self) -> dict[str, float]:
        w = max(self.weight, 1e-12)
        return {k: (v if k.endswith("/max") else v / w) for k, v in self.sums.items()}


def micro_weight(micro: TrainBatch, whole: TrainBatch, aggregation: str) -> float:
    """The share of a micro-batch in its mini-batch, so that accumulated gradients equal the
    gradient of the mini-batch's loss: tokens for token_mean, rows for the per-sequence modes."""
    if aggregation == "token_mean":
        return float(micro.loss_mask.sum() / whole.loss_mask.sum().clamp(min=1))
    return len(micro) / len(whole)


class TorchLearner:
    """Single-process learner (CPU or one GPU) with gradient accumulation and clipping."""

    def __init__(
        self,
        lm: nn.Module,
        cfg: RunConfig,
        device: torch.device,
        total_updates: int,
        reference: nn.Module | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.lm = lm.to(device=device, dtype=torch.float32)
        enable_gradient_checkpointing(self.lm, cfg)
        autocast = torch.bfloat16 if cfg.model.dtype == "bfloat16" else None
        self.module = logprob_model(self.lm, cfg, autocast)
        self.reference = self._reference(reference, torch.float32, autocast)
        # what computes (logprobs, entropy): the module here, the DeepSpeed engine in the subclass
        self.forward: nn.Module = self.module
        params = [p for p in self.lm.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda=lr_lambda(cfg, total_updates)
        )

    def _reference(
        self, model: nn.Module | None, dtype: torch.dtype, autocast: torch.dtype | None
    ) -> LogprobModel | None:
        """The frozen reference policy of ``objective.kl_coef`` (the initial model), or None."""
        if self.cfg.objective.kl_coef <= 0:
            return None
        if model is None:
            raise ValueError(
                f"objective.kl_coef={self.cfg.objective.kl_coef} needs a reference model; "
                "pass reference= (the trainer loads model.name)"
            )
        model = model.to(device=self.device, dtype=dtype).requires_grad_(False).eval()
        return logprob_model(model, self.cfg, autocast)

    def logprobs(self, batch: TrainBatch) -> tuple[Tensor, Tensor]:
        """Log-probs and entropies of the batch's loss-mask tokens without gradients (old
        log-probs); 0 at the other positions, which no loss reads."""
        self.forward.eval()
        outs = []
        with torch.no_grad():
            for micro in micro_batches(batch, self.cfg.trainer.micro_batch_size):
                micro = micro.to(self.device)
                outs.append(
                    self.forward(
                        micro.input_ids, micro.attention_mask, micro.target_ids, micro.loss_mask
                    )
                )
        logprobs = torch.cat([o[0] for o in outs]).float().cpu()
        return logprobs, torch.cat([o[1] for o in outs]).float().cpu()

    def accumulate(self, batch: TrainBatch, zeta: float, eps_high: float) -> dict[str, float]:
        """The mini-batch's gradient, accumulated over micro-batches into ``.grad`` (not yet
        clipped, no step): the gradient the DeepSpeed learner's tests compare against."""
        self.forward.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = MetricAccumulator()
        total_loss = 0.0
        for micro in micro_batches(batch, self.cfg.trainer.micro_batch_size):
            weight = micro_weight(micro, batch, self.cfg.objective.aggregation)
            loss, m = self._micro_loss(micro.to(self.device), zeta, eps_high)
            (loss * weight).backward()
            total_loss += float(loss.detach()) * weight
            metrics.add(m, float(micro.loss_mask.sum()))
        return {**metrics.result(), "loss/total": total_loss}

    def update(self, batch: TrainBatch, zeta: float, eps_high: float) -> dict[str, float]:
        """One optimizer step over a mini-batch (accumulated over micro-batches)."""
        return self.finish(self.accumulate(batch, zeta, eps_high))

    def finish(self, out: dict[str, float]) -> dict[str, float]:
        """Clip the accumulated gradients and step, unless the loss or the gradient norm is not
        finite (then the step is skipped and ``nonfinite`` is 1)."""
        total_loss = out["loss/total"]
        params = [p for p in self.lm.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.trainer.grad_clip))
        out.update({"grad/norm": grad_norm, "optim/lr": self.scheduler.get_last_lr()[0]})
        if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            out["nonfinite"] = 1.0
            return out
        self.optimizer.step()
        self.scheduler.step()
        out["nonfinite"] = 0.0
        return out

    def _micro_loss(self, micro: TrainBatch, zeta: float, eps_high: float):
        logprobs, entropy = self.forward(
            micro.input_ids, micro.attention_mask, micro.target_ids, micro.loss_mask
        )
        old = micro.old_logprobs
        if old is None:
            # no precomputed old log-probs: with objective.old_logprobs=learner that means a single
            # update per batch (the loop skips the extra pass), where the old policy is the
            # current one, so its log-probs are this forward's, detached
            on_policy = self.cfg.objective.old_logprobs == "learner"
            old = logprobs.detach() if on_policy else micro.sampler_logprobs
        inputs = LossInputs(
            logprobs=logprobs.float(),
            entropy=entropy.float(),
            old_logprobs=old,
            sampler_logprobs=micro.sampler_logprobs,
            advantages=micro.advantages,
            loss_mask=micro.loss_mask,
            max_tokens=self.cfg.rollout.max_new_tokens * self.cfg.rollout.max_turns,
            ref_logprobs=self._reference_logprobs(micro),
        )
        return policy_loss(inputs, self.cfg.objective, zeta, eps_high)

    def _reference_logprobs(self, micro: TrainBatch) -> Tensor | None:
        if self.reference is None:
            return None
        with torch.no_grad():
            logprobs, _ = self.reference(
                micro.input_ids, micro.attention_mask, micro.target_ids, micro.loss_mask
            )
        return logprobs.float()

    def named_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        """Full weights with HF names, one tensor at a time, for pushing to the policy and
        saving (with LoRA, the merged base weights under the base model's names); cast to
        ``dtype`` (the sampler's) when given, else as held (float32 master weights)."""
        for name, tensor in export_state(self.lm, self.lm.state_dict()).items():
            yield name, (tensor if dtype is None else tensor.to(dtype))

    def save_state(self, folder: Path) -> None:
        """Optimizer and scheduler state, into a checkpoint folder being written."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, folder / "learner.pt")

    def load_state(self, folder: Path) -> None:
        state = torch.load(folder / "learner.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def make_optimizer(params: list[nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    """``trainer.optimizer``: AdamW (training), or plain SGD (``w -= lr * g``, which keeps two
    learners' trajectories as close as their gradients: the exactness checks use it)."""
    if cfg.trainer.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)
    return torch.optim.AdamW(
        params,
        lr=cfg.trainer.lr,
        betas=tuple(cfg.trainer.betas),
        weight_decay=cfg.trainer.weight_decay,
    )


def lr_lambda(cfg: RunConfig, total_updates: int):
    warmup = cfg.trainer.warmup_steps
    schedule = cfg.trainer.lr_schedule

    def factor(update: int) -> float:
        if warmup and update < warmup:
            return (update + 1) / warmup
        if schedule == "cosine":
            progress = (update - warmup) / max(1, total_updates - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def build_learner(
    lm: nn.Module,
    cfg: RunConfig,
    device: torch.device,
    total_updates: int,
    reference: nn.Module | None = None,
) -> TorchLearner:
    """The learner ``trainer.learner`` names: torch (one process) or deepspeed (ZeRO 1/2/3)."""
    if cfg.trainer.learner == "deepspeed":
        from trainer.deepspeed_learner import DeepSpeedLearner

        return DeepSpeedLearner(lm, cfg, device, total_updates, reference)
    return TorchLearner(lm, cfg, device, total_updates, reference)


def enable_gradient_checkpointing(lm: nn.Module, cfg: RunConfig) -> None:
    """``trainer.gradient_checkpointing``: transformers' per-layer activation recomputation
    (non-reentrant, so it composes with the FP32 path's custom backward and with LoRA)."""
    if cfg.trainer.gradient_checkpointing:
        hf_model(lm).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )


def hf_model(lm: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``lm``: itself, or the model a peft wrapper holds
    (whose own ``base_model`` is peft's tuner, not the transformer body)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def lora_scalings(lm: nn.Module) -> dict[str, dict[str, float]]:
    """Each LoRA layer's ``{adapter: alpha / r}`` by module name (empty without LoRA)."""
    if not hasattr(lm, "get_base_model"):
        return {}
    from peft.tuners.lora import LoraLayer

    return {
        name: module.scaling for name, module in lm.named_modules() if isinstance(module, LoraLayer)
    }


def export_state(
    lm: nn.Module, state: dict[str, Tensor], scalings: dict | None = None
) -> dict[str, Tensor]:
    """``state`` (``lm.state_dict()``, gathered) under the names transformers and vLLM load.

    Without LoRA it is returned as is. With LoRA every adapted layer's weight is merged,
    ``W + scaling * B @ A`` (Hu et al., 2021), the adapter tensors are dropped and peft's name
    prefixes removed (``base_model.model.``, ``.base_layer``), so a checkpoint or a sampler
    sees a plain model of the base architecture. One layer at a time: no copy of the model."""
    if not hasattr(lm, "get_base_model"):
        return state
    # a part of the state (one streamed bucket) passes the scalings computed once for the model
    scalings = lora_scalings(lm) if scalings is None else scalings
    merged: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix("base_model.model.")
        layer = key.rsplit(".base_layer.", 1)[0] if ".base_layer." in key else None
        if layer is not None:
            name = name.replace(".base_layer.", ".")
            if key.endswith(".base_layer.weight"):
                for adapter, scaling in scalings[layer].items():
                    a = state[f"{layer}.lora_A.{adapter}.weight"].float()
                    b = state[f"{layer}.lora_B.{adapter}.weight"].float()
                    tensor = (tensor.float() + scaling * (b @ a)).to(tensor.dtype)
        merged[name] = tensor
    return merged


def apply_lora(lm: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap ``lm`` with LoRA adapters (peft): only the adapters train; checkpoints merge them."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as exc:
        raise ImportError("trainer.lora.enabled needs peft: pip install -e .[lora]") from exc
    return get_peft_model(
        lm,
        PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
