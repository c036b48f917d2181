"""Conversations as prompts: the model's chat template, and the tokens that end its turn.

A conversation is a list of {"role": ..., "content": ...} dicts (roles as the template knows them:
"system", "user", "assistant"). It is rendered with the tokenizer's chat template and the
generation prompt (what `tokenizer.apply_chat_template(conv, add_generation_prompt=True)` gives),
and the template's end-of-turn token (`<|im_end|>` for SmolLM2 and Qwen, `<end_of_turn>` for
Gemma, `<|eot_id|>` for Llama 3) stops the row.
"""

from __future__ import annotations

from typing import Any

# End-of-turn markers of the common templates; a template's own is found by looking for these.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


def is_conversation(prompt: Any) -> bool:
    # Any dict makes it a conversation, so a malformed one is refused by check_conversation
    # (not read as token ids).
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and any(isinstance(m, dict) for m in prompt))


def check_conversation(prompt: list, index: int) -> None:
    for j, message in enumerate(prompt):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise ValueError(f"prompt {index} is a conversation whose message {j} is not a "
                             '{"role": str, "content": str} dict: got ' + repr(message)[:120])


def encode_conversation(tokenizer, prompt: list, index: int = 0) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template."""
    check_conversation(prompt, index)
    if tokenizer is None:
        raise ValueError(f"prompt {index} is a conversation, but this model has no tokenizer "
                         "(and so no chat template): pass token-id lists")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompt {index} is a conversation, but this model's tokenizer has no "
                         "chat template: pass a string or token ids instead")
    ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
    if hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids of the end-of-turn markers this tokenizer has (as single tokens)."""
    if tokenizer is None:
        return []
    vocab = tokenizer.get_vocab()
    return sorted({int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab})
