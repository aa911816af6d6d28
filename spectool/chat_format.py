"""The chat format: a conversation's turns, the target's chat template, and which tokens a draft learns.

`Message` is one turn. `ChatFormat` renders turns with a tokenizer's chat template (or an override), gives the
prompt ids a model answers and the ids that end an assistant turn, and marks the assistant tokens: a draft learns
what the target generates, so exactly the assistant turns (with their end-of-turn token, which the draft must
predict too) are supervised, and template-inserted empty ``<think></think>`` blocks are not. `ChatFormat.tokenize`
gives a `TokenizedExample` (token ids and that loss mask).

Decoding (``spectool.runtime``: chat, bench) and training both use this module; it imports neither.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from spectool.errors import SpectoolError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Role = Literal["system", "user", "assistant"]
AssistantTurns = Literal["all", "last"]

#: An empty thinking block that Qwen3-style templates insert at the start of an assistant turn.
_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
_TRAILING_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*$")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation, with the role normalised to system / user / assistant."""

    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class TokenizedExample:
    """One training row: token ids and a loss mask (1 on supervised assistant tokens), plus per-token position
    ids and document ids that restart for every document packed into the row (0 and 0 when not packed)."""

    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int] = field(default_factory=list)
    document_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.loss_mask) != len(self.input_ids):
            raise ValueError(f"loss_mask has {len(self.loss_mask)} entries for {len(self.input_ids)} tokens")
        if not self.position_ids:
            self.position_ids = list(range(len(self.input_ids)))
        if not self.document_ids:
            self.document_ids = [0] * len(self.input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)

    def truncated(self, max_length: int) -> TokenizedExample:
        """The first ``max_length`` tokens (right truncation keeps the prompt the answer depends on)."""
        return TokenizedExample(
            self.input_ids[:max_length],
            self.loss_mask[:max_length],
            self.position_ids[:max_length],
            self.document_ids[:max_length],
        )


class ChatTemplateError(SpectoolError):
    """The chat template could not render a conversation, or its assistant turns could not be located."""


class ChatFormat:
    """A tokenizer's chat template (or an override) plus what loss masking needs to know about it.

    The supervised span of an assistant turn is found from the template itself, without ``{% generation %}``
    tags: render the conversation before the turn with ``add_generation_prompt=True``; where that prompt ends in
    the full rendering, the assistant's generation starts. It ends with the end-of-turn token (the first special
    token the template puts after an assistant's content, found once by probing), which is supervised because a
    draft must predict it. An empty ``<think></think>`` block at the start of the span is the template's, not the
    model's, and stays unsupervised. Character spans map to tokens through the fast tokenizer's offsets.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise SpectoolError("the tokenizer has no chat template; pass one (--chat-template FILE)")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.template_kwargs = dict(template_kwargs or {})
        self._special_texts = self._special_token_texts()
        #: The token that closes the final assistant turn (what generation stops at), and every end-of-turn token.
        self.end_of_turn, self.end_of_turn_texts = self._probe_end_of_turn()

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages`` (special tokens as text; tokenize without adding more)."""
        from jinja2.exceptions import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(
                [message.to_dict() for message in messages],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
                **self.template_kwargs,
            )
        except (TemplateError, ValueError, TypeError) as exc:
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ChatTemplateError(f"the chat template failed: {first_line}") from None
        if not isinstance(text, str):
            raise ChatTemplateError(f"the chat template rendered {type(text).__name__}, not text")
        return text

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the prompt a model answers: the conversation plus the assistant generation prompt."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an assistant turn: the end-of-turn token and the tokenizer's eos."""
        ids = []
        if self.end_of_turn is not None:
            ids.append(self.tokenizer.convert_tokens_to_ids(self.end_of_turn))
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted({i for i in ids if isinstance(i, int) and i >= 0})

    def _special_token_texts(self) -> list[str]:
        texts = {token.content for token in self.tokenizer.added_tokens_decoder.values() if token.special}
        if self.tokenizer.eos_token:
            texts.add(self.tokenizer.eos_token)
        return sorted(texts, key=len, reverse=True)

    def _probe_end_of_turn(self) -> tuple[str | None, tuple[str, ...]]:
        """The special token the template writes right after an assistant's content (e.g. ``<|im_end|>``), for
        a final turn and for a turn that later turns follow (some templates close the two differently)."""
        question, answer = Message("user", "spectool-probe-question"), Message("assistant", "spectool-probe-answer")
        found: list[str] = []
        for messages in ([question, answer], [question, answer, question]):
            try:
                text = self.render(messages)
            except ChatTemplateError:
                if len(messages) == 2:  # a template that cannot render one exchange is unusable
                    raise
                continue
            at = text.find(answer.content)
            tail = text[at + len(answer.content) :] if at >= 0 else ""
            hits = [(tail.find(special), special) for special in self._special_texts if special in tail]
            if hits and min(hits)[1] not in found:
                found.append(min(hits)[1])
        return (found[0] if found else None), tuple(found)

    def assistant_spans(
        self, messages: Sequence[Message], text: str, assistant_turns: AssistantTurns = "all"
    ) -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` of the supervised assistant text inside ``text`` (the rendering of
        all of ``messages``): each assistant turn, or only the last one."""
        indices = [i for i, message in enumerate(messages) if message.role == "assistant"]
        if assistant_turns == "last":
            indices = indices[-1:]
        return [self._assistant_span(messages, index, text) for index in indices]

    def _assistant_span(self, messages: Sequence[Message], index: int, text: str) -> tuple[int, int]:
        number = sum(1 for message in messages[: index + 1] if message.role == "assistant")
        prompt = self.render(messages[:index], add_generation_prompt=True)
        start = None
        # A template may open the generation with an empty think block that the history rendering drops.
        for candidate in (prompt, _TRAILING_EMPTY_THINK.sub("", prompt)):
            if text.startswith(candidate):
                start = len(candidate)
                break
        if start is None:
            raise ChatTemplateError(
                f"assistant turn {number}: the chat template renders the conversation before it differently from "
                "the prompt it answers; supervise only the last turn (assistant_turns='last')"
            )
        think = _EMPTY_THINK.match(text, start)
        if think:
            start = think.end()
        # When the template renders the turn the same way with and without later turns, the turn is the text
        # between the prompt and the end of that rendering, and it ends with the last special token in it (an
        # end-of-turn string inside the content cannot cut it short; templates that close a turn with a token
        # other than the probed one, like <|end|> vs <|return|>, are handled too).
        alone = self.render(messages[: index + 1])
        if text.startswith(alone) and len(alone) >= start:
            found = [(text.rfind(special, start, len(alone)), special) for special in self._special_texts]
            ends = [position + len(special) for position, special in found if position >= 0]
            return start, max(ends) if ends else start + len(text[start : len(alone)].rstrip())
        # Otherwise (e.g. Qwen3 drops reasoning from earlier turns) the turn ends at the next end-of-turn token.
        found = [(text.find(special, start), special) for special in self.end_of_turn_texts]
        found = [(position, special) for position, special in found if position >= 0]
        if not found:
            raise ChatTemplateError(
                f"assistant turn {number}: cannot find where it ends (no end-of-turn token after it, and the "
                "template renders it differently once later turns follow)"
            )
        position, special = min(found)
        return start, position + len(special)

    def tokenize(self, messages: Sequence[Message], assistant_turns: AssistantTurns = "all") -> TokenizedExample:
        """Render and tokenize a conversation's turns; the loss mask is 1 exactly on supervised assistant tokens."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise SpectoolError("loss masks need a fast tokenizer (one with a tokenizer.json) for character offsets")
        text = self.render(messages)
        spans = self.assistant_spans(messages, text, assistant_turns)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoding["input_ids"])
        return TokenizedExample(input_ids, _mask_from_spans(encoding["offset_mapping"], spans))


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a span."""
    mask = [0] * len(offsets)
    ordered = sorted(spans)
    cursor = 0
    for position, (begin, end) in enumerate(offsets):
        if end <= begin:
            continue
        while cursor < len(ordered) and ordered[cursor][1] <= begin:
            cursor += 1
        if cursor < len(ordered) and ordered[cursor][0] < end:
            mask[position] = 1
    return mask
