"""Helpers shared by the learner benchmarks (not a benchmark: `run_all.py` skips ``_*.py``).

- :func:`machine`: CPU model (lscpu), cores, memory, load; the header of every result file.
- :func:`fixed_batch`: the fixed batch of SmolLM2 sequences the learner benchmarks time;
  :func:`fixed_train_batch`: the same as our learner's ``TrainBatch``.
- :func:`time_steps`: warm-up then timed repetitions, with peak RSS sampled during the steps.
- :func:`write_result`: ``benchmarks/results/<name>.md`` with machine, date and command.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from agent.io import atomic_write_text  # noqa: E402


def machine() -> str:
    """``<CPU model>, <N> CPUs (<cores> cores), <RAM> GiB RAM, <platform>; load <1-min avg>``."""
    model, cpus, cores_per_socket, sockets = "unknown CPU", os.cpu_count(), None, None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields.get("Model name", model)
        cpus = int(fields.get("CPU(s)", cpus))
        cores_per_socket = fields.get("Core(s) per socket")
        sockets = fields.get("Socket(s)")
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    cores = (
        f", {int(cores_per_socket) * int(sockets)} cores"
        if cores_per_socket and sockets and cores_per_socket.isdigit() and sockets.isdigit()
        else ""
    )
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{model}, {cpus} CPUs{cores}, {mem_gib:.0f} GiB RAM, {platform.platform()}; "
        f"1-min load average {os.getloadavg()[0]:.1f} at the start"
    )


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def fixed_batch(batch: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0):
    """A seeded batch of token sequences: ``batch`` rows of ``prompt_len`` prompt tokens then
    ``completion_len`` sampled tokens, with sampler log-probs and one advantage per row.
    Token ids avoid the first 200 ids (SmolLM2's special tokens); the content does not matter
    for timing, only the shapes do."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(200, vocab, (batch, prompt_len), generator=gen)
    completion = torch.randint(200, vocab, (batch, completion_len), generator=gen)
    sampler_logprobs = -torch.rand(batch, completion_len, generator=gen) * 3
    advantages = torch.linspace(-1, 1, batch)
    return prompt, completion, sampler_logprobs, advantages


def fixed_train_batch(batch: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0):
    """:func:`fixed_batch` as the learner's ``TrainBatch``: position t predicts token t + 1, so the
    completion tokens are targets from position ``prompt_len - 1`` on; the sampler's log-probs
    double as the old log-probs (``objective.old_logprobs: sampler``)."""
    import torch

    from trainer.learner import TrainBatch

    prompt, completion, sampler, advantages = fixed_batch(
        batch, prompt_len, completion_len, vocab, seed
    )
    sequence = torch.cat([prompt, completion], dim=1)
    width = sequence.shape[1] - 1
    loss_mask = torch.zeros(batch, width)
    loss_mask[:, prompt_len - 1 :] = 1.0
    logprobs = torch.zeros(batch, width)
    logprobs[:, prompt_len - 1 :] = sampler
    return TrainBatch(
        input_ids=sequence[:, :-1],
        attention_mask=torch.ones(batch, width, dtype=torch.long),
        target_ids=sequence[:, 1:],
        loss_mask=loss_mask,
        sampler_logprobs=logprobs,
        advantages=advantages,
        old_logprobs=logprobs,
    )


class RssSampler:
    """Peak resident memory of this process, sampled every 5 ms while active."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def time_steps(step: Callable[[], None], warmup: int, repeats: int) -> dict:
    """Median / min seconds of ``step`` over ``repeats`` runs after ``warmup`` runs, and the
    peak RSS (bytes) seen during the timed runs."""
    for _ in range(warmup):
        step()
    times = []
    with RssSampler() as rss:
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "peak_rss": rss.peak,
    }


def write_result(name: str, title: str, body: str, started: str, machine_line: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    text = (
        f"# {title}\n\n- Command: `{command()}`\n- Date: {started}\n- Machine: {machine_line}\n\n"
        f"{body.strip()}\n"
    )
    return atomic_write_text(path, text)
