"""Dry run of a DeepSpeed config: ``python -m trainer.ds_dryrun CONFIG [key=value ...]``.

A GPU config (``configs/appworld_*.yaml``) cannot be tried here at its size, but everything
that decides whether it starts can: the config is resolved, the memory per GPU of the real
model is worked out from its architecture (built on the meta device: no weights, no hub), and
the DeepSpeed engine is built on the CPU for a tiny model of the same architecture family,
with the config's ZeRO stage, dtype, offload, LoRA and gradient checkpointing, then one update
runs. The header it prints is the memory arithmetic; exit status 0 means the engine started.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch

from trainer.config import RunConfig, load_config

GiB = 2**30

# the public architecture of the models the GPU configs name (their config.json), for the
# arithmetic; the engine itself is built for a tiny model of the same family
ARCHITECTURES: dict[str, dict] = {
    "Qwen/Qwen2.5-7B-Instruct": {
        "family": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen3-32B": {
        "family": "qwen3",
        "hidden_size": 5120,
        "intermediate_size": 25600,
        "num_hidden_layers": 64,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def _model(family: str, dims: dict, meta: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **dims)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _lora_numel(model, cfg: RunConfig) -> int:
    """Parameters the LoRA adapters add: r x (in + out) per adapted linear layer."""
    targets = set(cfg.trainer.lora.target_modules)
    return sum(
        cfg.trainer.lora.r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def memory_lines(cfg: RunConfig, numel: int, trainable: int, world: int, gpu_gib: float) -> list:
    """GiB per GPU of the learner's parts and of the sampler, and host memory for offload: a
    lower bound (DeepSpeed's communication buffers and the activations come on top)."""
    ds = cfg.trainer.deepspeed
    stage = ds.zero_stage
    weight_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    weights = numel * weight_bytes / (world if stage == 3 else 1)
    grads = trainable * weight_bytes / (world if stage >= 2 else 1)
    master = trainable * 4 / world if weight_bytes == 2 else 0.0
    adam = trainable * 8 / world
    on_host = master + adam if ds.offload_optimizer else 0.0
    on_gpu = weights + grads + (0.0 if ds.offload_optimizer else master + adam)
    vllm = cfg.policy.vllm
    sampler = 0.0
    if cfg.policy.backend == "vllm":
        sampler = vllm.gpu_memory_utilization * gpu_gib * GiB
    lines = [
        f"model: {numel / 1e9:.2f}B parameters, {trainable / 1e9:.3f}B trainable"
        + (f" (LoRA r={cfg.trainer.lora.r})" if cfg.trainer.lora.enabled else ""),
        f"ZeRO-{stage} on {world} GPUs, weights {cfg.model.dtype}, fp32 master weights"
        + (", optimizer offloaded to CPU" if ds.offload_optimizer else ""),
        f"  weights  {weights / GiB:7.1f} GiB/GPU",
        f"  grads    {grads / GiB:7.1f} GiB/GPU",
        f"  master   {master / GiB:7.1f} GiB/{'host rank' if ds.offload_optimizer else 'GPU'}",
        f"  adam m,v {adam / GiB:7.1f} GiB/{'host rank' if ds.offload_optimizer else 'GPU'}",
        f"  learner  {on_gpu / GiB:7.1f} GiB/GPU before activations (micro-batch "
        f"{cfg.trainer.micro_batch_size}, gradient checkpointing "
        f"{'on' if cfg.trainer.gradient_checkpointing else 'off'})",
        f"  sampler  {sampler / GiB:7.1f} GiB/GPU (vLLM gpu_memory_utilization "
        f"{vllm.gpu_memory_utilization} of {gpu_gib:.0f} GiB: its weights + KV cache)",
        f"  total    {(on_gpu + sampler) / GiB:7.1f} GiB of {gpu_gib:.0f} GiB per GPU"
        + (f"; host {on_host * world / GiB:.0f} GiB for {world} ranks" if on_host else ""),
        f"  checkpoint {min(numel * weight_bytes, cfg.checkpoint.max_shard_gb * 1e9) / GiB:5.1f} "
        "GiB of host RAM on rank 0 while a checkpoint is written (one shard, "
        f"checkpoint.max_shard_gb; {numel * weight_bytes / GiB:.1f} GiB for a model transformers "
        "converts on save)",
    ]
    return lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dry_run(cfg: RunConfig, world: int, gpu_gib: float) -> dict:
    """Print the memory arithmetic, then build the engine for a tiny model of the family and
    run one update on the CPU; returns what was built."""
    from trainer.deepspeed_learner import DeepSpeedLearner, init_distributed, zero3_construction
    from trainer.learner import TrainBatch, apply_lora, hf_model

    if cfg.trainer.learner != "deepspeed":
        raise ValueError(f"trainer.learner={cfg.trainer.learner!r}: the dry run is for deepspeed")
    arch = ARCHITECTURES.get(cfg.model.name)
    if arch is None:
        raise ValueError(
            f"model.name={cfg.model.name!r}: no architecture known to the dry run "
            f"(known: {', '.join(ARCHITECTURES)})"
        )
    family, dims = arch["family"], {k: v for k, v in arch.items() if k != "family"}
    real = _model(family, dims, meta=True)
    numel = sum(p.numel() for p in real.parameters())
    trainable = _lora_numel(real, cfg) if cfg.trainer.lora.enabled else numel
    print(f"eprl dry run: {cfg.model.name} ({family})")
    for line in memory_lines(cfg, numel, trainable, world, gpu_gib):
        print("  " + line)

    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cpu = cfg.model_copy(deep=True)
    cpu.trainer.device = "cpu"
    device = torch.device("cpu")
    init_distributed(device, cpu.trainer.deepspeed.timeout_s)
    tiny = {**dims, **TINY, "head_dim": 16} if "head_dim" in dims else {**dims, **TINY}
    with tempfile.TemporaryDirectory() as folder:
        _model(family, tiny, meta=False).save_pretrained(folder)
        keep_alive = zero3_construction(cpu)  # ZeRO-3: built partitioned, as in training
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if cpu.trainer.lora.enabled:
            lm = apply_lora(lm, cpu.trainer.lora)
        learner = DeepSpeedLearner(lm, cpu, device, total_updates=1)
        ids = torch.randint(
            0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0)
        )
        mask = torch.ones(2, 8)
        batch = TrainBatch(
            ids[:, :-1],
            torch.ones(2, 8, dtype=torch.long),
            ids[:, 1:],
            mask,
            torch.full((2, 8), -3.0),
            torch.tensor([1.0, -1.0]),
        )
        out = learner.update(batch, zeta=0.0, eps_high=cpu.objective.eps_high)
        exported = sum(t.numel() for _, t in learner.named_weights())
        del keep_alive
    built = {
        "family": family,
        "engine": type(learner.engine).__name__,
        "optimizer": type(learner.engine.optimizer).__name__,
        "param_dtype": str(next(learner.engine.module.parameters()).dtype),
        "gradient_checkpointing": bool(hf_model(learner.lm).is_gradient_checkpointing),
        "nonfinite": out["nonfinite"],
        "exported_numel": exported,
    }
    print(
        f"  engine on CPU for a tiny {family}: {built['engine']} with {built['optimizer']}, "
        f"weights {built['param_dtype']}, gradient checkpointing "
        f"{'on' if built['gradient_checkpointing'] else 'off'}, one update "
        f"{'skipped (non-finite)' if built['nonfinite'] else 'done'}"
    )
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    parser.add_argument("--world", type=int, default=8, help="GPUs the run is planned for")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU")
    args = parser.parse_args(argv)
    if args.world < 1 or args.gpu_gib <= 0:
        parser.error(f"--world must be >= 1 and --gpu-gib > 0, got {args.world}, {args.gpu_gib}")
    cfg = load_config(Path(args.config), args.overrides)
    built = dry_run(cfg, args.world, args.gpu_gib)
    return 0 if built["nonfinite"] == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
