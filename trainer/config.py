"""Typed run configuration: YAML files plus dotted command-line overrides.

A run is described by one :class:`RunConfig`. Every section forbids unknown keys, so a typo is an
error that names the key instead of a silently ignored setting::

    cfg = load_config("configs/quickstart.yaml", ["trainer.lr=1e-6", "rollout.group_size=8"])

Override values are parsed as YAML scalars/lists (``1e-6`` -> float, ``[a, b]`` -> list,
``null`` -> None). :func:`save_config` writes the resolved config; loading it back gives an equal
object (round trip).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.config import DEFAULT_STOP, PolicyConfig
from agent.io import atomic_write_text, read_data_file
from serving.settings import TOKEN_ENV_VAR


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which weights to load: the embedded default, a local HF folder, or a hub name."""

    name: str = "smollm2-135m-instruct"
    # dtype of the learner's (and in-process policy's) weights; the loss path is set by `precision`
    dtype: Literal["float32", "bfloat16"] = "float32"
    # the transformer body's attention kernel (transformers' attn_implementation): sdpa by
    # default; flash_attention_2 / _3 on GPUs with flash-attn installed, where the learner packs
    # sequences for its varlen kernels (trainer/packing.py, docs/training.md)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"

    @model_validator(mode="after")
    def _flash_needs_half_precision(self) -> ModelConfig:
        if self.attn_implementation.startswith("flash") and self.dtype != "bfloat16":
            raise ValueError(
                f"model.attn_implementation={self.attn_implementation!r} runs only in 16-bit "
                f"precision and the body would run in {self.dtype}: set model.dtype=bfloat16 "
                "(the LM head and the loss stay in float32) or use sdpa"
            )
        return self


class EnvConfig(_Section):
    """The Gymnasium environment and the split that training draws tasks from."""

    id: str = "eprl/CodeExec-v0"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    train_split: str = "train"
    # remote environment service replicas; empty -> environments run in this process
    urls: list[str] = Field(default_factory=list)
    token_env: str = TOKEN_ENV_VAR
    # a CA bundle that verifies the service's TLS certificate (a private CA, a self-signed
    # one); None: $EPRL_CA_FILE if set, else the system's trust store
    ca_file: str | None = None


class RolloutConfig(_Section):
    tasks_per_step: int = Field(4, ge=1)
    group_size: int = Field(4, ge=1, description="K episodes per task (a group)")
    max_turns: int = Field(1, ge=1)
    max_new_tokens: int = Field(96, ge=1, description="tokens per agent turn")
    max_context_tokens: int = Field(2048, ge=16)
    # a turn ends at the end of a code cell; EOS also ends it
    stop: list[str] = Field(default_factory=lambda: list(DEFAULT_STOP))
    env_workers: int = Field(8, ge=1, description="threads stepping environments concurrently")
    max_parallel_episodes: int | None = Field(
        None,
        ge=1,
        description="episodes rolled out at once; None -> 32 (hf) / 256 (vllm), and for AppWorld "
        "no more than its server pool (an episode holds a server from reset to end)",
    )

    def budget(self) -> dict[str, Any]:
        """The per-episode budget every rollout of a run shares (training, its evaluations,
        the demo's): keyword arguments of :class:`agent.rollout.RolloutRunner`."""
        return {
            "max_turns": self.max_turns,
            "max_new_tokens": self.max_new_tokens,
            "max_context_tokens": self.max_context_tokens,
            "stop": list(self.stop),
        }


def _faithful_controller(data: Any) -> Any:
    """``controller: faithful`` -> no dead band and no smoothing (methods.md: the paper's rule is
    plain doubling/halving toward the initial entropy; the band and the smoothing are ours).
    Setting either to a nonzero value beside it is an error, not silently overridden."""
    if not isinstance(data, dict) or data.get("controller") != "faithful":
        return data
    for key in ("dead_band", "smoothing"):
        if data.get(key, 0.0) not in (0, 0.0):
            raise ValueError(
                f"controller 'faithful' has no {key}; got {key}={data[key]} (drop it, or use "
                "controller 'eprl')"
            )
    return {**data, "dead_band": 0.0, "smoothing": 0.0}


class RepoConfig(_Section):
    """REPO: advantage shaping with the sampled token's log-prob (methods.md; the variants are
    documented in :func:`trainer.objectives.repo_shaped_advantages`)."""

    variant: Literal["none", "r", "r_centred", "r_submitted", "r_sym", "d", "const_beta"] = "none"
    zeta_init: float = Field(0.02, ge=0)
    zeta_min: float = Field(1e-4, ge=0)
    # the arXiv version's bound; larger zeta can flip an advantage's sign in the unclamped forms
    zeta_max: float = Field(0.05, ge=0)
    factor: float = Field(2.0, gt=1)
    # eprl: a dead band and smoothing of our own (the defaults); faithful: neither (the paper's)
    controller: Literal["eprl", "faithful"] = "eprl"
    dead_band: float = Field(0.05, ge=0, lt=1, description="relative band around the target")
    smoothing: float = Field(
        0.0, ge=0, lt=1, description="EMA weight of the past in the controlled entropy (0: raw)"
    )
    target_entropy: float | None = Field(None, description="None -> entropy of the first batch")

    _preset = model_validator(mode="before")(_faithful_controller)

    @model_validator(mode="after")
    def _bounds(self) -> RepoConfig:
        if not self.zeta_min <= self.zeta_init <= self.zeta_max:
            raise ValueError(
                f"need zeta_min <= zeta_init <= zeta_max, got {self.zeta_min}, "
                f"{self.zeta_init}, {self.zeta_max}"
            )
        return self


class AdapoConfig(_Section):
    """ADAPO: adapt eps_high toward a target entropy (methods.md)."""

    enabled: bool = False
    eps_high_min: float | None = Field(None, description="None -> objective.eps_low")
    eps_high_max: float = Field(0.5, gt=0)
    factor: float = Field(1.1, gt=1)
    controller: Literal["eprl", "faithful"] = "eprl"
    dead_band: float = Field(0.05, ge=0, lt=1)
    smoothing: float = Field(0.0, ge=0, lt=1)
    target_entropy: float | None = None

    _preset = model_validator(mode="before")(_faithful_controller)


class ObjectiveConfig(_Section):
    advantage: Literal["rloo", "grpo", "dr_grpo"] = "rloo"
    # LOOP drops episodes whose |advantage| is below this threshold (0 keeps all)
    adv_filter_threshold: float = Field(0.0, ge=0)
    # DAPO's overlong filtering: an episode whose last turn was cut at rollout.max_new_tokens
    # keeps its reward in its group's baseline but is left out of the loss (and out of the
    # target-entropy measurement), so a truncated ramble is not pushed down token by token
    overlong_filter: bool = False
    eps_low: float = Field(0.2, ge=0, lt=1)
    eps_high: float = Field(0.28, ge=0)
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = (
        "token_mean"
    )
    entropy_coef: float = 0.0
    kl_coef: float = Field(0.0, ge=0)
    # truncated importance sampling against the sampler's log-probs; None disables it
    tis_cap: float | None = Field(None, gt=0)
    # where the PPO ratio's "old" log-probs come from: recomputed by the learner (LOOP) or the
    # sampler's own
    old_logprobs: Literal["learner", "sampler"] = "learner"
    repo: RepoConfig = RepoConfig()
    adapo: AdapoConfig = AdapoConfig()
    # REPO's / ADAPO's target entropy, when their target_entropy is unset: > 0 -> measured before
    # step 1 on this many train tasks x rollout.group_size samples of the untrained policy (no
    # update); 0 -> the first batch's entropy (a few groups: a noisy estimate)
    target_entropy_tasks: int = Field(0, ge=0)


class DeepSpeedConfig(_Section):
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    # how long a collective waits for the other ranks before the group fails (an evaluation or a
    # slow rollout on one rank must end within it)
    timeout_s: float = Field(1800.0, gt=0)
    # the weight export gathers ZeRO-3 parameters a bucket of whole modules at a time (a module
    # larger than this is its own bucket): the export's peak extra memory is about one bucket
    export_bucket_numel: int = Field(2**27, ge=1)
    # which Adam steps the offloaded fp32 master weights (offload_optimizer): auto: DeepSpeed's
    # compiled CPU Adam on a GPU machine, the torch AdamW on a CPU one (no op to compile);
    # deepspeed / torch: that one wherever the run is (deepspeed on CPU JIT-compiles the op)
    offload_adam: Literal["auto", "deepspeed", "torch"] = "auto"

    @model_validator(mode="after")
    def _offload_adam_needs_offload(self) -> DeepSpeedConfig:
        if self.offload_adam != "auto" and not self.offload_optimizer:
            raise ValueError(
                f"trainer.deepspeed.offload_adam={self.offload_adam!r} chooses the Adam of the "
                "offloaded optimizer: set trainer.deepspeed.offload_optimizer=true, or leave "
                "offload_adam at 'auto'"
            )
        return self


class LoraConfig(_Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


class TrainerConfig(_Section):
    """The learner: optimisation settings and which backend runs them."""

    learner: Literal["torch", "deepspeed"] = "torch"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # sgd: plain gradient descent, for checks that compare two learners step by step
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per epoch")
    micro_batch_size: int = Field(4, ge=1, description="episodes per forward/backward")
    max_nonfinite_in_a_row: int = Field(3, ge=1)
    # a batch whose loss has no gradient (every advantage 0 and no term that acts without one,
    # objectives.has_learning_signal) makes no update: AdamW would otherwise keep stepping along
    # its momentum; logged as train/no_signal
    skip_no_signal: bool = True
    # recompute each layer's activations in the backward instead of keeping them: less memory
    # for long AppWorld episodes at 7B-32B, about a third more compute
    gradient_checkpointing: bool = False
    # the forward's layout (trainer/packing.py, docs/training.md): each group's shared prompt
    # computed once for its K episodes, and rows of different lengths packed without padding;
    # auto: where exact (an attention implementation that takes an explicit mask: sdpa, eager)
    # and estimated faster; on: always, or a clear error; off: the plain padded forward
    shared_prefix: Literal["auto", "on", "off"] = "auto"
    packing: Literal["auto", "on", "off"] = "auto"
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="before")
    @classmethod
    def _on_off_words(cls, data: Any) -> Any:
        """YAML reads a bare ``on``/``off`` as true/false: take them back as the words."""
        if isinstance(data, dict):
            for key in ("shared_prefix", "packing"):
                if isinstance(data.get(key), bool):
                    data = {**data, key: "on" if data[key] else "off"}
        return data

    @model_validator(mode="after")
    def _deepspeed_adam_is_adam(self) -> TrainerConfig:
        if self.deepspeed.offload_adam == "deepspeed" and self.optimizer != "adamw":
            raise ValueError(
                "trainer.deepspeed.offload_adam='deepspeed' is DeepSpeed's CPU AdamW, but "
                f"trainer.optimizer={self.optimizer!r}: use trainer.optimizer=adamw, or "
                "offload_adam 'torch' / 'auto'"
            )
        return self


class PrecisionConfig(_Section):
    """The loss path's arithmetic. `bf16` exists only to reproduce the failure (methods.md);
    `fp16` is the "FP16 fix" reading of the paper's headline row (with a static loss scale in the
    backward): pair it with `policy.vllm.dtype: float16` so the sampler rounds the same way."""

    loss: Literal["fp32", "bf16", "fp16"] = "fp32"
    # 256 keeps the extra memory of a 4096-token sequence with a 49k vocabulary under 256 MB
    # (benchmarks/results/loss_path_memory.md); larger chunks are faster on GPUs with memory to spare
    chunk_size: int = Field(256, ge=1, description="tokens per chunk of the LM-head projection")


class EvalConfig(_Section):
    every: int = Field(0, ge=0, description="evaluate every N steps; 0 -> only at the end")
    split: str = "dev"
    k: int = Field(4, ge=1)
    num_tasks: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    at_start: bool = True
    at_end: bool = Field(
        True, description="evaluate after the last step (`eprl demo` turns it off)"
    )


class LoggingConfig(_Section):
    runs_root: str = "runs"
    run_name: str | None = None
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "eprl"
    progress: bool = True


class CheckpointConfig(_Section):
    every: int = Field(10, ge=1)
    keep_last: int = Field(2, ge=1)
    save_optimizer: bool = True
    # the weights are written in safetensors shards of at most this size, streamed: rank 0 holds
    # one shard in host memory at a time, not the model (trainer/checkpoint.py)
    max_shard_gb: float = Field(5.0, gt=0)


class RunConfig(_Section):
    seed: int = 0
    steps: int = Field(20, ge=1)
    model: ModelConfig = ModelConfig()
    policy: PolicyConfig = PolicyConfig()
    env: EnvConfig = EnvConfig()
    rollout: RolloutConfig = RolloutConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    trainer: TrainerConfig = TrainerConfig()
    precision: PrecisionConfig = PrecisionConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _held_out(self) -> RunConfig:
        if self.policy.backend == "openai" and not self.policy.server.urls:
            raise ValueError(
                "policy.backend='openai' cannot be trained without policy.server.urls: a served "
                "checkpoint's weights follow the learner's only in server mode (vLLM servers in "
                "dev mode, docs/sampling.md); else use hf or vllm (openai is for `eprl eval`)"
            )
        if self.env.train_split == self.eval.split:
            raise ValueError(
                f"env.train_split and eval.split are both {self.eval.split!r}: the evaluation "
                "split must be held out from training"
            )
        if (
            self.objective.kl_coef > 0
            and self.trainer.learner == "deepspeed"
            and self.trainer.deepspeed.zero_stage == 3
        ):
            raise ValueError(
                f"objective.kl_coef={self.objective.kl_coef} keeps a full copy of the reference "
                "model on every rank, which ZeRO-3 exists to avoid: use "
                "trainer.deepspeed.zero_stage 1 or 2, or objective.kl_coef=0"
            )
        if self.policy.top_p < 1 and self.objective.old_logprobs == "sampler":
            raise ValueError(
                f"policy.top_p={self.policy.top_p} with objective.old_logprobs='sampler': the "
                "sampler's log-probs are of the renormalised top-p nucleus, the learner's of the "
                "full distribution, so the PPO ratio would start below 1 on every token (and "
                "the low clip could silence negative advantages); use "
                "objective.old_logprobs=learner (the default) or policy.top_p=1"
            )
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = e.get("input")
            lines.append(f"  {key}: {e['msg']} (got {got!r})")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``a.b.c``, checking each key against the schema."""
    keys = dotted.split(".")
    model: type[BaseModel] | None = RunConfig
    node = tree
    for depth, key in enumerate(keys):
        if model is not None:
            if key not in model.model_fields:
                prefix = ".".join(keys[:depth]) or "<root>"
                valid = ", ".join(sorted(model.model_fields))
                raise ConfigError(
                    f"unknown config key {dotted!r}: {prefix} has no {key!r} (valid: {valid})"
                )
            annotation = model.model_fields[key].annotation
            model = (
                annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel)
                else None
            )
        if depth == len(keys) - 1:
            node[key] = value
        else:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key!r}: cannot parse value {raw!r}: {exc}") from exc
        _set_dotted(tree, key.strip(), value)
    return tree


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None
) -> RunConfig:
    """Load a YAML run config (None -> all defaults) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        loaded = read_data_file(p, "config file", "YAML", error=ConfigError)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(p)!r} must hold a mapping, got {type(loaded).__name__}"
            )
        tree = loaded or {}
        source = str(p)
    apply_overrides(tree, overrides or [])
    return config_from_dict(tree, source)


def save_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config (every default filled in) atomically."""
    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
