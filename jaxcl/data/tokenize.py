"""Tokenizer adapters: batched encoding and chat templates for any tokenizer jaxcl meets.

Three kinds of tokenizer are accepted everywhere in :mod:`jaxcl.data`:

* the byte tokenizer of the tiny presets (:class:`jaxcl.models.tokenizer.ByteTokenizer`);
* a Hugging Face ``transformers`` tokenizer (``PreTrainedTokenizerBase``): texts are encoded in
  one batched call, without the tokenizer's own special tokens (jaxcl adds bos/eos itself), and
  chat messages go through ``apply_chat_template``;
* anything with ``encode(text) -> list[int]`` and ``eos_token_id`` (``bos_token_id`` and
  ``pad_token_id`` may be ``None``: no bos is added, padding uses id 0).

Chat messages are rendered turn by turn: the template is applied to the first ``i`` messages and
the text each new message adds is tokenized on its own, so every token is attributed exactly to
one message; tokens added by assistant messages are trained (loss mask 1), the rest (system, user
turns, role headers of the generation prompt) are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CHAT_ROLES = ("system", "user", "assistant", "tool")

# The fallback chat layout for tokenizers without a template (the byte tokenizer).
_PLAIN_TURN = "<|{role}|>\n{content}\n"
_PLAIN_GENERATION = "<|assistant|>\n"


def special_ids(tokenizer: Any) -> tuple[int | None, int, int]:
    """``(bos, eos, pad)``; bos may be ``None``; pad falls back to 0."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id")
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    return bos, int(eos), int(pad) if pad is not None else 0


def _is_hf(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "apply_chat_template") and callable(tokenizer)


def token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of every text, without special tokens, in one batched call where possible."""
    texts = list(texts)
    if not texts:
        return []
    if _is_hf(tokenizer):
        out = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(map(int, ids)) for ids in out]
    if type(tokenizer).__name__ == "ByteTokenizer":  # vectorised bytes -> ids
        offset = int(tokenizer.offset)
        return [
            (np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) + offset).tolist()
            for t in texts
        ]
    return [list(tokenizer.encode(t)) for t in texts]


def check_messages(messages: Any, where: str = "example") -> list[dict[str, str]]:
    """Validate a chat: a list of ``{role, content}`` with at least one assistant message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: field 'messages[{i}]' must be an object, got {m!r}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(
                f"{where}: field 'messages[{i}].role' must be one of {', '.join(CHAT_ROLES)}, "
                f"got {role!r}"
            )
        if not isinstance(content, str):
            raise ValueError(
                f"{where}: field 'messages[{i}].content' must be a string, got {content!r}"
            )
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: field 'messages' has no assistant message to train on")
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    if _is_hf(tokenizer) and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
    text = "".join(_PLAIN_TURN.format(**m) for m in messages)
    return text + (_PLAIN_GENERATION if generation else "")


def chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered chat cut into ``(text, trained)`` pieces, in order.

    Before each assistant message the generation prompt (role header) is an untrained piece;
    the rest of that message's rendering (content and end-of-turn marker) is trained.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:i], generation=True)
            if header.startswith(done):
                pieces.append((header[len(done) :], False))
                done = header
        full = _render(tokenizer, messages[: i + 1], generation=False)
        if not full.startswith(done):
            raise ValueError(
                "the chat template does not render conversations prefix by prefix; "
                "jaxcl cannot attribute tokens to messages with it"
            )
        pieces.append((full[len(done) :], message["role"] == "assistant"))
        done = full
    return [(t, trained) for t, trained in pieces if t]


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered chat and its loss mask (1 on assistant tokens)."""
    pieces = chat_segments(tokenizer, messages)
    ids_per_piece = token_ids(tokenizer, [t for t, _ in pieces])
    bos, eos, _ = special_ids(tokenizer)
    templated = bool(_is_hf(tokenizer) and getattr(tokenizer, "chat_template", None))
    ids: list[int] = []
    mask: list[int] = []
    for (_, trained), piece in zip(pieces, ids_per_piece):
        if trained and not templated:
            piece = [*piece, eos]  # the plain layout has no end-of-turn token: eos ends a reply
        ids += piece
        mask += [int(trained)] * len(piece)
    if bos is not None and not templated:
        ids, mask = [bos, *ids], [0, *mask]
    return ids, mask
