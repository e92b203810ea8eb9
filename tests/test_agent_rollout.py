"""Policy log-probs, token-in/token-out conversations and the rollout runner (tiny model)."""

import gymnasium
import pytest
import torch

import envs  # noqa: F401  (registers the ids)
from agent.chat import ChatFormat
from agent.models import load_model, load_tokenizer
from agent.policy import HFPolicy, sampling_logprobs
from agent.rollout import Episode, RolloutRunner, read_jsonl, write_jsonl

# a template that trims assistant messages: re-rendering a conversation does not reproduce the
# sampled text, so re-tokenising would silently change what the learner trains on
TRIMMING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{{ m['content'] | trim }}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def prompts_for(tokenizer, texts):
    chat = ChatFormat(tokenizer)
    return [chat.prompt_ids(text) for text in texts]


def test_sampling_logprobs_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    logp = sampling_logprobs(logits, temperature=1.0, top_p=0.7)
    # nucleus = {0.5, 0.3} (mass 0.8 >= 0.7), renormalised
    assert torch.allclose(logp[0, :2].exp(), torch.tensor([0.625, 0.375]), atol=1e-6)
    assert torch.isinf(logp[0, 2:]).all()
    hot = sampling_logprobs(logits, temperature=2.0, top_p=1.0)
    expected = torch.softmax(logits / 2.0, -1).log()
    assert torch.allclose(hot, expected, atol=1e-6)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9)])
def test_hf_logprobs_match_a_separate_forward_pass(tiny, temperature, top_p):
    model, tokenizer = tiny
    policy = HFPolicy(model, tokenizer, temperature=temperature, top_p=top_p)
    prompts = prompts_for(tokenizer, ["Write a function add(a, b).", "Hi", "Sort a list, please."])
    torch.manual_seed(0)
    generations = policy.generate(prompts, max_new_tokens=24)
    for prompt, gen in zip(prompts, generations, strict=True):
        assert len(gen.token_ids) == len(gen.logprobs) > 0
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen.token_ids])).logits[0, len(prompt) - 1 : -1]
        reference = sampling_logprobs(logits, temperature, top_p)
        reference = reference.gather(1, torch.tensor(gen.token_ids)[:, None]).squeeze(1)
        assert torch.isfinite(reference).all(), "a sampled token fell outside the nucleus"
        assert torch.allclose(torch.tensor(gen.logprobs), reference, atol=1e-4)


def test_shared_prompts_and_rows_ending_early_keep_exact_logprobs(tiny):
    """The decode loop prefills identical prompts once and drops finished rows from the batch
    and its KV cache: every row must still be what a separate forward pass scores, and the
    copies of one prompt must sample independently."""
    model, tokenizer = tiny
    policy = HFPolicy(model, tokenizer, temperature=1.0)
    group = prompts_for(tokenizer, ["Write a function add(a, b)."])[0]
    other = prompts_for(tokenizer, ["Hi"])[0]
    prompts = [group, group, other, group, other]
    torch.manual_seed(1)
    # single letters stop rows at scattered steps, so the batch shrinks while others go on
    generations = policy.generate(prompts, max_new_tokens=20, stop=["e", "a"])
    reasons = [gen.finish_reason for gen in generations]
    lengths = [len(gen.token_ids) for gen in generations]
    assert "stop" in reasons and len(set(lengths)) > 1, (reasons, lengths)
    assert len({tuple(generations[i].token_ids) for i in (0, 1, 3)}) > 1
    for prompt, gen in zip(prompts, generations, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen.token_ids])).logits[0, len(prompt) - 1 : -1]
        reference = sampling_logprobs(logits, 1.0, 1.0)
        reference = reference.gather(1, torch.tensor(gen.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(gen.logprobs), reference, atol=1e-4)


def test_sampler_draws_from_the_given_distribution():
    from agent.policy import _sample

    probs = torch.tensor([0.1, 0.25, 0.0, 0.65])
    torch.manual_seed(0)
    draws = _sample(probs.log().expand(40_000, 4).contiguous())
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[2] == 0  # probability 0 (-inf log-prob) is never drawn
    assert torch.allclose(freq, probs, atol=0.01), freq


def test_stop_string_ends_the_turn_where_it_appears(tiny):
    model, tokenizer = tiny
    policy = HFPolicy(model, tokenizer, temperature=1.0)
    prompt = prompts_for(tokenizer, ["Hello"])
    torch.manual_seed(3)
    free = policy.generate(prompt, max_new_tokens=12)[0]
    assert free.finish_reason in ("length", "eos")
    # take the text of the 5th sampled token as the stop string; the same seed must stop there
    stop = tokenizer.decode(free.token_ids[4:5])
    assert stop.strip(), "pick a token with visible text"
    first = next(
        i for i in range(len(free.token_ids)) if stop in tokenizer.decode(free.token_ids[: i + 1])
    )
    torch.manual_seed(3)
    stopped = policy.generate(prompt, max_new_tokens=12, stop=[stop])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1]


class RecordingPolicy:
    """Wraps the real HF policy and keeps what it sampled (to check the episode's ids)."""

    def __init__(self, inner):
        self.inner, self.tokenizer, self.outputs = inner, inner.tokenizer, []

    def generate(self, prompts, max_new_tokens, stop=(), *, temperature=None):
        gens = self.inner.generate(prompts, max_new_tokens, stop, temperature=temperature)
        self.outputs.append([list(p) for p in prompts])
        self.outputs.append(gens)
        return gens

    def update_weights(self, named):
        self.inner.update_weights(named)


class RecordObservations(gymnasium.Wrapper):
    log: list = []

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.log.append(("reset", obs))
        return obs, info

    def step(self, action):
        result = self.env.step(action)
        self.log.append(("step", result[0], result[2] or result[3]))
        return result


def make_codeexec(**kwargs):
    return lambda: gymnasium.make(
        "eprl/CodeExec-v0", task_set="procedural", split="train", **kwargs
    )


def test_token_in_token_out_with_a_template_that_is_not_append_only(tiny):
    model, tokenizer = tiny
    tokenizer = load_tokenizer(model.name_or_path)
    tokenizer.chat_template = TRIMMING_TEMPLATE
    chat = ChatFormat(tokenizer)
    policy = RecordingPolicy(HFPolicy(model, tokenizer, temperature=1.0))
    RecordObservations.log = []
    runner = RolloutRunner(
        policy,
        lambda: RecordObservations(make_codeexec(max_turns=3)()),
        chat,
        group_size=1,
        max_turns=3,
        max_new_tokens=16,
        max_context_tokens=4096,
    )
    env = make_codeexec()()
    task = env.unwrapped.task_ids("train")[0]
    env.close()
    torch.manual_seed(0)
    (episode,) = runner.run([task])
    generations = [g[0] for g in policy.outputs[1::2]]
    observations = [entry[1] for entry in RecordObservations.log]

    expected = chat.prompt_ids(observations[0])
    for turn, gen in enumerate(generations):
        expected += gen.token_ids
        is_last = turn == len(generations) - 1
        if not is_last:
            expected += chat.observation_ids(observations[turn + 1], gen.finish_reason == "eos")
    assert episode.token_ids == expected
    assert episode.num_turns == len(generations) >= 2

    # the loss mask covers exactly the sampled tokens; sampler log-probs sit on them
    assert episode.num_sampled_tokens == sum(len(g.token_ids) for g in generations)
    for (start, end), gen in zip(episode.turns, generations, strict=True):
        assert episode.token_ids[start:end] == gen.token_ids
        assert episode.sampler_logprobs[start:end] == gen.logprobs
    sampled_positions = {i for start, end in episode.turns for i in range(start, end)}
    assert all(
        episode.loss_mask[i] == (i in sampled_positions) for i in range(len(episode.token_ids))
    )

    # re-rendering the conversation with the template would not give the sampled ids back
    messages = [{"role": "user", "content": observations[0]}]
    for turn, gen in enumerate(generations):
        messages.append(
            {
                "role": "assistant",
                "content": tokenizer.decode(gen.token_ids, skip_special_tokens=True),
            }
        )
        if turn + 1 < len(observations):
            messages.append({"role": "user", "content": observations[turn + 1]})
    retokenised = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=False
    )
    retokenised = retokenised if isinstance(retokenised, list) else retokenised["input_ids"]
    assert retokenised[: len(episode.token_ids)] != episode.token_ids


def test_groups_turn_limit_context_limit_and_jsonl(tiny, tmp_path):
    model, tokenizer = tiny
    policy = HFPolicy(model, tokenizer, temperature=1.0)
    chat = ChatFormat(tokenizer)
    env = make_codeexec()()
    tasks = env.unwrapped.task_ids("train")[:2]
    env.close()

    runner = RolloutRunner(
        policy,
        make_codeexec(max_turns=10),
        chat,
        group_size=3,
        max_turns=2,
        max_new_tokens=8,
        max_context_tokens=4096,
    )
    episodes = runner.run(tasks, seed=5)
    assert [ep.task_id for ep in episodes] == [tasks[0]] * 3 + [tasks[1]] * 3
    assert [ep.group_id for ep in episodes] == [0, 0, 0, 1, 1, 1]
    assert len({ep.seed for ep in episodes}) == 6
    for ep in episodes:
        assert ep.error is None
        # random tokens never submit: the runner's 2-turn cap ends the episode
        assert ep.truncated and ep.truncation_reason == "max_turns" and ep.num_turns == 2
        assert len(ep.token_ids) == len(ep.loss_mask) == len(ep.sampler_logprobs)
        assert ep.prompt_len > 0 and not any(ep.loss_mask[: ep.prompt_len])

    prompt_len = episodes[0].prompt_len
    tight = RolloutRunner(
        policy,
        make_codeexec(max_turns=10),
        chat,
        group_size=1,
        max_turns=5,
        max_new_tokens=8,
        max_context_tokens=prompt_len + 9,
    )
    (short,) = tight.run(tasks[:1], seed=5)
    assert short.truncated and short.truncation_reason == "context_limit"
    assert len(short.token_ids) <= prompt_len + 9 and short.num_turns == 1

    path = tmp_path / "trajectories.jsonl"
    write_jsonl(path, episodes)
    again = read_jsonl(path)
    assert again == episodes and isinstance(again[0], Episode)


class GradesCutEpisodes(gymnasium.Wrapper):
    """A test wrapper standing in for an environment that grades a cut episode (AppWorld's
    ``truncate``): it records the reasons it was asked with and gives 0.25 of credit."""

    def __init__(self, env):
        super().__init__(env)
        self.reasons = []

    def truncate(self, reason):
        self.reasons.append(reason)
        return 0.25, {"success": False, "truncation_reason": reason}


def test_an_episode_the_runner_cuts_is_graded_by_an_env_that_can(tiny):
    """Turn-limit and context-limit cuts ask the env for the episode's partial credit; envs
    without ``truncate`` keep reward 0 (CodeExec: the cut episodes above)."""
    model, tokenizer = tiny
    policy = HFPolicy(model, tokenizer, temperature=1.0)
    made = []

    def make_env():
        made.append(GradesCutEpisodes(make_codeexec(max_turns=10)()))
        return made[-1]

    env = make_codeexec()()
    task = env.unwrapped.task_ids("train")[0]
    env.close()
    runner = RolloutRunner(
        policy, make_env, ChatFormat(tokenizer), group_size=2, max_turns=2, max_new_tokens=8
    )
    episodes = runner.run([task], seed=5)
    assert [ep.truncation_reason for ep in episodes] == ["max_turns", "max_turns"]
    assert [ep.reward for ep in episodes] == [0.25, 0.25]
    assert [w.reasons for w in made] == [["max_turns"], ["max_turns"]]
    assert all(ep.info["truncation_reason"] == "max_turns" for ep in episodes)

    made.clear()
    prompt_len = episodes[0].prompt_len
    tight = RolloutRunner(
        policy,
        make_env,
        ChatFormat(tokenizer),
        group_size=1,
        max_turns=5,
        max_new_tokens=8,
        max_context_tokens=prompt_len + 9,
    )
    (short,) = tight.run([task], seed=5)
    assert short.truncation_reason == "context_limit" and short.reward == 0.25
    assert made[0].reasons == ["context_limit"]


def test_a_failing_environment_ends_only_its_episode(tiny):
    model, tokenizer = tiny
    policy = HFPolicy(model, tokenizer)
    runner = RolloutRunner(
        policy, make_codeexec(), ChatFormat(tokenizer), group_size=2, max_new_tokens=8
    )
    env = make_codeexec()()
    good = env.unwrapped.task_ids("train")[0]
    env.close()
    episodes = runner.run([good, "no-such-task"])
    assert all(ep.error is None for ep in episodes[:2])
    assert all("no-such-task" in ep.error for ep in episodes[2:])


def test_runner_rejects_bad_limits(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        RolloutRunner(
            HFPolicy(model, tokenizer), make_codeexec(), ChatFormat(tokenizer), group_size=0
        )
    with pytest.raises(ValueError, match="max_context_tokens"):
        RolloutRunner(
            HFPolicy(model, tokenizer),
            make_codeexec(),
            ChatFormat(tokenizer),
            max_new_tokens=64,
            max_context_tokens=64,
        )


def test_temperature_is_a_parameter_of_generation_not_of_the_policy(tiny):
    """An evaluation samples at its own temperature through generate(temperature=...) and the
    rollout runner; the policy a training run keeps using is left as it was."""
    model, tokenizer = tiny
    policy = HFPolicy(model, tokenizer, temperature=1.0)
    prompts = prompts_for(tokenizer, ["Write a function add(a, b).", "Hi"])
    torch.manual_seed(0)
    greedy = policy.generate(prompts, max_new_tokens=12, temperature=0.0)
    torch.manual_seed(1)
    again = policy.generate(prompts, max_new_tokens=12, temperature=0.0)
    assert [g.token_ids for g in greedy] == [g.token_ids for g in again]
    assert policy.temperature == 1.0
    torch.manual_seed(0)
    sampled = policy.generate(prompts, max_new_tokens=12)
    assert [g.token_ids for g in sampled] != [g.token_ids for g in greedy]
    with torch.no_grad():
        logits = model(torch.tensor([prompts[1]])).logits[0, -1]
    assert greedy[1].token_ids[0] == int(logits.argmax())
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        policy.generate(prompts, max_new_tokens=4, temperature=-1.0)

    make_env = make_codeexec()
    env = make_env()
    task = env.unwrapped.task_ids("train")[0]
    env.close()
    runner = RolloutRunner(policy, make_env, ChatFormat(tokenizer), group_size=2, temperature=0.0)
    first, second = runner.run([task], seed=5)
    assert first.token_ids == second.token_ids  # greedy: the group's two samples agree
    assert policy.temperature == 1.0
