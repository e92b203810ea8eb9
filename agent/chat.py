"""Token-in / token-out conversations (design.md).

The chat template is applied once, to the first user message. After that the conversation only
grows: each agent turn appends the ids the policy sampled, each observation is appended as a
tokenised *delta* (the end of the assistant turn, the user turn holding the observation, and the
next generation prompt). Nothing already in the context is ever re-tokenised, so the learner
trains on exactly the ids the sampler produced, whatever the template does to earlier turns when
a conversation is re-rendered (trimming, dropping reasoning, ...).

The delta's pieces are read off the template itself by rendering a conversation with sentinel
strings. The template need not render a conversation as a prefix of its extension: Qwen3's, for
one, adds an empty ``<think>`` block to the *last* assistant turn only, so the same turn renders
differently once a user turn follows it. Only the text *after* an assistant turn's content is
read (how the turn closes, then the next user turn and the generation prompt), and it is read
from the longer rendering, where the turn is no longer last; past turns are never re-rendered.
"""

from __future__ import annotations

_USER = "EPRLSENTINELUSERTEXT"
_ASSISTANT = "EPRLSENTINELASSISTANTTEXT"
_OBSERVATION = "EPRLSENTINELOBSERVATIONTEXT"


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be extended turn by turn."""


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


class ChatFormat:
    """Builds the first prompt and the per-observation deltas for one tokenizer."""

    def __init__(self, tokenizer, system_prompt: str | None = None) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise TemplateError(
                "the tokenizer has no chat template (tokenizer.chat_template is None)"
            )
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        head = [{"role": "system", "content": system_prompt}] if system_prompt else []
        base = head + [
            {"role": "user", "content": _USER},
            {"role": "assistant", "content": _ASSISTANT},
        ]
        base_text = _render(tokenizer, base, add_generation_prompt=False)
        extended = _render(
            tokenizer,
            base + [{"role": "user", "content": _OBSERVATION}],
            add_generation_prompt=True,
        )
        counts = (base_text.count(_ASSISTANT), extended.count(_ASSISTANT))
        if counts != (1, 1) or extended.count(_OBSERVATION) != 1:
            raise TemplateError(
                "the chat template does not render each message's content exactly once; "
                "token-in/token-out rollouts need one that does"
            )
        # text that closes an assistant turn, e.g. "<|im_end|>\n"
        self.assistant_close = base_text[base_text.index(_ASSISTANT) + len(_ASSISTANT) :]
        after = extended[extended.index(_ASSISTANT) + len(_ASSISTANT) :]
        if not after.startswith(self.assistant_close):
            raise TemplateError(
                "the chat template closes an assistant turn differently when a user turn follows "
                f"({self.assistant_close!r} vs {after[: len(self.assistant_close)]!r}); "
                "token-in/token-out rollouts need one closing"
            )
        delta = after[len(self.assistant_close) :]
        self.observation_prefix, self.observation_suffix = delta.split(_OBSERVATION)
        # whether earlier turns render differently once the conversation grows (Qwen3-style)
        self.append_only = extended.startswith(base_text)
        eos = tokenizer.eos_token or ""
        self._eos_text = eos

    def prompt_ids(self, user_text: str) -> list[int]:
        """The first prompt: (system,) user, and the generation prompt, tokenised once."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": user_text})
        text = _render(self.tokenizer, messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def observation_ids(self, observation: str, turn_ended_with_eos: bool) -> list[int]:
        """The delta appended after an agent turn: the rest of the assistant turn's closing text
        (the EOS token, when the policy sampled it, is already in the context), then the user turn
        holding the observation, then the generation prompt."""
        close = self.assistant_close
        if turn_ended_with_eos and self._eos_text and close.startswith(self._eos_text):
            close = close[len(self._eos_text) :]
        text = close + self.observation_prefix + observation + self.observation_suffix
        return self.tokenizer.encode(text, add_special_tokens=False)
