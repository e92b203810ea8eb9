"""The `eprl` command line: thin wiring of envs, agent, trainer and serving (no logic here).

Heavy modules are imported inside each command so that `eprl --help` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

app = typer.Typer(
    help="eprl: entropy-preserving RL for LLM agents (AppWorld and code execution).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
appworld_app = typer.Typer(
    help="AppWorld runtime: setup, offline data, diagnostics.", no_args_is_help=True
)
app.add_typer(appworld_app, name="appworld")


def _fail(exc: Exception) -> None:
    typer.echo(f"eprl: error: {exc}", err=True)
    raise typer.Exit(2)


@contextmanager
def _bad_input_exits() -> Iterator[None]:
    """Bad input (a ValueError naming the value) ends a command with its message on stderr and
    exit status 2, not a traceback."""
    try:
        yield
    except ValueError as exc:
        _fail(exc)


@app.command()
def train(
    config: Annotated[
        str | None, typer.Argument(help="run config YAML (default: all defaults)")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides, e.g. trainer.lr=1e-6")
    ] = None,
    resume: Annotated[str | None, typer.Option(help="continue the run in this directory")] = None,
) -> None:
    """Train a policy: rollouts -> advantages -> objective -> updates -> checkpoints."""
    from trainer.loop import train_from_cli as run

    with _bad_input_exits():
        run(config, overrides or [], resume)


@app.command()
def demo(
    config: Annotated[str, typer.Argument(help="run config YAML")] = "configs/quickstart.yaml",
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides, e.g. steps=6")
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(help="run the demo for N seeds (config seed, +1, ...) and report the median"),
    ] = 1,
    num_tasks: Annotated[int, typer.Option(help="held-out tasks evaluated before and after")] = 40,
    k: Annotated[int, typer.Option(help="held-out samples per task")] = 2,
    out: Annotated[
        str | None, typer.Option(help="with --seeds: the resumable JSON of every seed's numbers")
    ] = None,
) -> None:
    """The quick start: train the embedded model, then evaluate it against the untrained one."""
    from trainer.config import load_config
    from trainer.demo import run_demo, run_seeds

    with _bad_input_exits():
        if seeds < 1 or num_tasks < 1 or k < 1:
            raise ValueError(
                f"--seeds, --num-tasks and --k must be >= 1, got {seeds}, {num_tasks}, {k}"
            )
        if seeds == 1 and out is None:
            run_demo(config, num_tasks, k, overrides or [])
            return
        first = load_config(config, overrides or []).seed
        run_seeds(
            config,
            list(range(first, first + seeds)),
            out or f"runs/demo_seeds_{first}-{first + seeds - 1}.json",
            num_tasks,
            k,
            overrides or [],
        )


# vLLM engine knobs of `eprl eval` / `eprl rollout` (policy.vllm.*; unset: its defaults)
_TP = Annotated[int | None, typer.Option(help="vLLM tensor-parallel size")]
_GPU_MEM = Annotated[float | None, typer.Option(help="vLLM GPU memory fraction (0, 1]")]
_DTYPE = Annotated[str | None, typer.Option(help="vLLM dtype: auto|float32|bfloat16|float16")]
_MAX_LEN = Annotated[int | None, typer.Option(help="vLLM max model length (tokens)")]
_BACKEND = Annotated[
    str | None, typer.Option(help="hf | vllm | openai (default: vllm where vLLM imports, else hf)")
]


def _backend(backend: str | None) -> str:
    """--backend, or the default (vllm where vLLM imports), said on stderr when defaulted."""
    if backend is not None:
        return backend
    from agent.backends import backend_reason
    from agent.config import PolicyConfig

    cfg = PolicyConfig()
    print(f"eprl: --backend not given: {cfg.backend} ({backend_reason(cfg)})", file=sys.stderr)
    return cfg.backend


@app.command(name="eval")
def evaluate(
    results: Annotated[
        list[str] | None,
        typer.Argument(
            help="with --compare: result JSONs to print side by side", show_default=False
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="checkpoint folder, model name or OpenAI-compatible URL"),
    ] = None,
    env: Annotated[
        str, typer.Option(help="environment id, e.g. eprl/CodeExec-v0")
    ] = "eprl/CodeExec-v0",
    split: Annotated[str, typer.Option(help="task split")] = "test",
    k: Annotated[int, typer.Option(help="samples per task")] = 4,
    backend: _BACKEND = None,
    out: Annotated[str | None, typer.Option(help="results JSON (resumable)")] = None,
    num_tasks: Annotated[int | None, typer.Option(help="evaluate only the first N tasks")] = None,
    env_kwargs: Annotated[str | None, typer.Option(help="environment kwargs as JSON")] = None,
    compare: Annotated[
        bool,
        typer.Option("--compare", help="print a side-by-side table of the RESULTS JSON files"),
    ] = False,
    confidence: Annotated[
        float, typer.Option(help="confidence level of the bootstrap intervals")
    ] = 0.95,
    resamples: Annotated[int, typer.Option(help="bootstrap replicates per interval")] = 2000,
    tensor_parallel_size: _TP = None,
    gpu_memory_utilization: _GPU_MEM = None,
    dtype: _DTYPE = None,
    max_model_len: _MAX_LEN = None,
) -> None:
    """Evaluate a model on an environment split: pass@1, pass@k, reward, success, diversity.

    `eprl eval --model M --out R.json` evaluates; `eprl eval --compare A.json B.json` compares."""
    from trainer.evaluation.cli import evaluate_cli as run

    if compare:
        if not results or len(results) < 2:
            _fail(
                ValueError(f"--compare needs at least two result JSON files, got {results or []}")
            )
    elif results:
        _fail(ValueError(f"unexpected arguments {results}; result files go with --compare"))
    elif model is None:
        _fail(ValueError("--model is required (a checkpoint folder, model name or URL)"))
    with _bad_input_exits():
        from agent.cli import vllm_options

        vllm = vllm_options(tensor_parallel_size, gpu_memory_utilization, dtype, max_model_len)
        run(
            model=model,
            env=env,
            split=split,
            k=k,
            backend=backend if compare else _backend(backend),
            out=out,
            num_tasks=num_tasks,
            env_kwargs=env_kwargs,
            compare=results if compare else None,
            confidence=confidence,
            resamples=resamples,
            vllm=vllm,
        )


@app.command()
def rollout(
    model: Annotated[str, typer.Option(help="model name or folder")] = "smollm2-135m-instruct",
    env: Annotated[str, typer.Option(help="environment id")] = "eprl/CodeExec-v0",
    split: Annotated[str, typer.Option(help="task split")] = "train",
    k: Annotated[int, typer.Option(help="episodes per task (group size)")] = 4,
    num_tasks: Annotated[int, typer.Option(help="number of tasks")] = 4,
    out: Annotated[str, typer.Option(help="output JSONL")] = "trajectories.jsonl",
    backend: _BACKEND = None,
    max_turns: Annotated[int, typer.Option(help="turn limit per episode")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per turn")] = 96,
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 1.0,
    env_kwargs: Annotated[str | None, typer.Option(help="environment kwargs as JSON")] = None,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    tensor_parallel_size: _TP = None,
    gpu_memory_utilization: _GPU_MEM = None,
    dtype: _DTYPE = None,
    max_model_len: _MAX_LEN = None,
) -> None:
    """Sample episodes and write them as JSONL (trajectories.jsonl)."""
    from agent.cli import rollout_cli as run
    from agent.cli import vllm_options

    with _bad_input_exits():
        vllm = vllm_options(tensor_parallel_size, gpu_memory_utilization, dtype, max_model_len)
        run(
            model=model,
            env=env,
            split=split,
            k=k,
            num_tasks=num_tasks,
            out=out,
            backend=_backend(backend),
            max_turns=max_turns,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            env_kwargs=env_kwargs,
            seed=seed,
            vllm=vllm,
        )


@app.command()
def serve(
    config: Annotated[
        str | None, typer.Option(help="serve config YAML (every ServeSettings key)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8000)")] = None,
    token: Annotated[str | None, typer.Option(help="bearer token (or $EPRL_TOKEN)")] = None,
    tokens_file: Annotated[
        str | None, typer.Option(help="file of tokens, one per line (re-read on SIGHUP)")
    ] = None,
    max_sessions: Annotated[
        int | None, typer.Option(help="bound on concurrent sessions (default 64)")
    ] = None,
    tls_certfile: Annotated[str | None, typer.Option(help="TLS certificate (PEM)")] = None,
    tls_keyfile: Annotated[str | None, typer.Option(help="TLS private key (PEM)")] = None,
    log_level: Annotated[str | None, typer.Option(help="uvicorn log level (default info)")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="any setting, e.g. --set idle_timeout_s=60 (repeatable)"),
    ] = None,
) -> None:
    """Run the environment service (FastAPI) for remote clients.

    Flags and --set override the config file; SIGTERM drains, SIGHUP reloads the tokens."""
    from serving.app import serve as run
    from serving.config import parse_sets

    with _bad_input_exits():
        overrides = parse_sets(set_ or [])
        flags = {
            "host": host,
            "port": port,
            "token": token or None,  # serve() falls back to the token environment variable
            "tokens_file": tokens_file,
            "max_sessions": max_sessions,
            "tls_certfile": tls_certfile,
            "tls_keyfile": tls_keyfile,
            "log_level": log_level,
        }
        run(config=config, **{**overrides, **{k: v for k, v in flags.items() if v is not None}})


@app.command()
def envs() -> None:
    """List registered environments, their task sets, splits and task counts."""
    from rich.console import Console
    from rich.table import Table

    import envs  # noqa: F401  (registers the ids)

    table = Table(title="eprl environments")
    for col in ("env id", "task set", "splits (tasks)"):
        table.add_column(col)
    for module in ("envs.codeexec", "envs.appworld"):
        if importlib.util.find_spec(module) is None:
            continue
        for row in importlib.import_module(module).catalogue():
            splits = ", ".join(f"{s} ({n})" for s, n in row["splits"].items()) or "-"
            table.add_row(row["env_id"], str(row.get("task_set", "-")), splits)
    table.add_row("eprl/Remote-v0", "any, served by `eprl serve`", "those of the remote env")
    Console().print(table)


@app.command()
def models(
    dirs: Annotated[
        list[str] | None, typer.Argument(help="extra folders to scan for HF models")
    ] = None,
) -> None:
    """Show the models available offline (the embedded SmolLM2 and local folders)."""
    from rich.console import Console
    from rich.table import Table

    from agent.models import list_models

    table = Table(title="models")
    for col in ("name", "source", "location", "ready"):
        table.add_column(col)
    for entry in list_models(dirs):
        table.add_row(entry.name, entry.source, entry.location, "yes" if entry.ready else "no")
    Console().print(table)


@appworld_app.command("setup")
def appworld_setup(
    root: Annotated[
        str | None, typer.Option(help="AppWorld root (default $APPWORLD_ROOT, else the cache)")
    ] = None,
    download: Annotated[
        bool, typer.Option(help="download AppWorld's released data (`appworld download data`)")
    ] = True,
) -> None:
    """Check the isolated AppWorld venv, unpack its apps, download the released data."""
    from envs.appworld.cli import setup

    raise typer.Exit(setup(root=root, download=download))


@appworld_app.command("make-data")
def appworld_make_data(
    out: Annotated[
        str | None, typer.Option(help="data root to create (default $EPRL_CACHE_DIR/appworld)")
    ] = None,
    seed: Annotated[int, typer.Option(help="generation seed")] = 0,
    tasks_per_scenario: Annotated[
        int, typer.Option(help="tasks per scenario (AppWorld uses 3)")
    ] = 3,
    validate: Annotated[
        bool, typer.Option(help="check every task: no-op fails, reference passes")
    ] = False,
) -> None:
    """Generate a small offline dataset in AppWorld's own format with the real apps."""
    from envs.appworld.cli import make_data as run

    raise typer.Exit(
        run(out=out, seed=seed, tasks_per_scenario=tasks_per_scenario, validate=validate)
    )


@appworld_app.command("doctor")
def appworld_doctor(
    root: Annotated[
        str | None, typer.Option(help="data root (default $APPWORLD_ROOT or the cache)")
    ] = None,
) -> None:
    """Say what is installed, where the data is, and whether a server starts."""
    from envs.appworld.cli import doctor

    raise typer.Exit(doctor(root=root))


def _absorb_launcher_args(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends --local_rank=N to every rank's command line; torchrun
    sets LOCAL_RANK instead. Move the flag into the environment so every launcher looks alike."""
    out, index = [], 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and index + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[index + 1])
            index += 1
        else:
            out.append(arg)
        index += 1
    return out


def main() -> None:
    sys.argv = _absorb_launcher_args(sys.argv)
    sys.exit(app())


if __name__ == "__main__":
    main()
