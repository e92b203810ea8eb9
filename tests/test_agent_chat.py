"""Token-in/token-out conversations with a chat template that is not append-only.

The template below is written for this test in the style of Qwen3's: an empty ``<think>`` block
is rendered inside the *last* assistant turn only, so a conversation does not render as a prefix
of its extension (the earlier turn loses its think block once a user turn follows).
"""

import pytest

from agent.chat import ChatFormat, TemplateError

THINK_ON_LAST_TURN = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}"
    "<|im_start|>assistant\n"
    "{% if loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def tokenizer():
    from agent.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")  # <|im_start|>/<|im_end|> are single tokens
    tok.chat_template = THINK_ON_LAST_TURN
    return tok


def render(tok, messages, gen):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_the_template_is_not_append_only(tokenizer):
    turn = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    short = render(tokenizer, turn, False)
    longer = render(tokenizer, [*turn, {"role": "user", "content": "o"}], True)
    assert "<think>" in short and "<think>" not in longer
    assert not longer.startswith(short)


def test_each_turn_appends_a_delta_and_past_tokens_are_never_retokenised(tokenizer):
    chat = ChatFormat(tokenizer, system_prompt="Solve it.")
    assert chat.append_only is False
    context = chat.prompt_ids("add 2 and 3")
    # the policy's turn, as sampled: its own think block, then the answer and EOS
    answer = "<think>\nsum\n</think>\n\n```python\nprint(2 + 3)\n```<|im_end|>"
    sampled = tokenizer.encode(answer, add_special_tokens=False)
    first = context + sampled
    context = first + chat.observation_ids("5", turn_ended_with_eos=True)
    assert context[: len(first)] == first  # nothing in the context was re-tokenised
    turn2 = tokenizer.encode("```python\nprint(5)\n```", add_special_tokens=False)
    context = context + turn2 + chat.observation_ids("done", turn_ended_with_eos=False)
    expected = (
        "<|im_start|>system\nSolve it.<|im_end|>\n<|im_start|>user\nadd 2 and 3<|im_end|>\n"
        "<|im_start|>assistant\n" + answer + "\n<|im_start|>user\n5<|im_end|>\n"
        "<|im_start|>assistant\n```python\nprint(5)\n```<|im_end|>\n"
        "<|im_start|>user\ndone<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(context) == expected
    # what the deltas add is the template's own rendering of those turns (the user turn and
    # the generation prompt after an assistant turn that is no longer the last)
    assert chat.observation_prefix == "<|im_start|>user\n"
    assert chat.observation_suffix == "<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_repeats_content_is_refused_with_the_reason(tokenizer):
    tokenizer.chat_template = (
        "{%- for m in messages %}{{ m.content }}{{ m.content }}{% endfor -%}"
        "{%- if add_generation_prompt %}>{% endif -%}"
    )
    with pytest.raises(TemplateError, match="exactly once"):
        ChatFormat(tokenizer)


def test_a_template_that_closes_turns_differently_is_refused(tokenizer):
    tokenizer.chat_template = (
        "{%- for m in messages -%}{{ m.role }}: {{ m.content }}"
        "{%- if loop.last %}<end>{% else %}<next>{% endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt %}assistant: {% endif -%}"
    )
    with pytest.raises(TemplateError, match="closes an assistant turn differently"):
        ChatFormat(tokenizer)
