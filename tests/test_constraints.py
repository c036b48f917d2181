"""js.Constraint: regex / JSON schema -> token DFA tables, and js.generate(..., constraint=...).

The tables are checked against Python's `re` by enumerating token sequences over a tiny word
vocabulary (this is what catches outlines-core 0.2.x dropping transitions out of final states).
End to end on the shipped tiny pair: every output matches the regex / validates against the JSON
schema (jsonschema), autoregressive and speculative, greedy and sampled; a new pattern of the same
table bucket does not recompile. Bad input: each error has its message checked.
(Greedy identity with speculation and the chi-square law test: tests/speculative/test_constrained.py.)
"""

from __future__ import annotations

import itertools
import json
import re
import sys

import jsonschema
import numpy as np
import pytest

import jaxspec as js
from jaxspec import constraints
from jaxspec.decoding import COMPILATIONS


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[-1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[-1])


WORDS = ["a", "b", "c", "1", ".", "ab", "ba", "1.", "x", "<eos>"]   # "x" never in a pattern
STOP = len(WORDS) - 1


@pytest.fixture(scope="module")
def words():
    return _word_tokenizer(WORDS)


@pytest.mark.parametrize("pattern", [
    r"1(\.1)?",            # a final state ("1") with a way on to a non-final one (".")
    r"(ab|ba)+c?",
    r"a(ba)*|b{2,3}",
    r"^1+(\.1+)?$",        # anchors are implicit: stripped
    r"a|c.*",              # "x" can follow c
])
def test_table_is_the_regex_language(words, pattern):
    """For every token sequence of length <= 4: the table ends in a final state iff the text
    fully matches, and it never rejects a prefix that can still be completed."""
    c = js.Constraint.regex(pattern, words, stop_tokens=[STOP])
    table, final = np.asarray(c.next_state), np.asarray(c.final)
    body = pattern.lstrip("^").rstrip("$")
    texts = ["".join(WORDS[t] for t in seq)
             for n in range(5) for seq in itertools.product(range(STOP), repeat=n)]
    viable = {t[:k] for t in texts if re.fullmatch(body, t) for k in range(len(t) + 1)}
    for n in range(5):
        for seq in itertools.product(range(STOP), repeat=n):
            s = int(c.start)
            for t in seq:
                s = table[s, t] if s >= 0 else -1
            text = "".join(WORDS[t] for t in seq)
            assert (s >= 0 and final[s]) == bool(re.fullmatch(body, text)), (seq, text)
            if text in viable:
                assert s >= 0, f"{text!r} is a prefix of a match but the table rejects it"
    for state in np.flatnonzero(np.any(table >= 0, axis=1)):   # stop exactly at final states
        assert (table[state, STOP] == state) == final[state]


def test_end_state_forces_the_stop(words):
    c = js.Constraint.regex("ab", words, stop_tokens=[STOP])
    table = np.asarray(c.next_state)
    end = table[int(c.start), WORDS.index("ab")]
    assert np.flatnonzero(table[end] >= 0).tolist() == [STOP]
    assert c.num_states == 3 and c.next_state.shape == (16, len(WORDS))


# -- end to end on the shipped pair ---------------------------------------------------------------

PROMPTS = ["def fib(n):", "x = ", "import os\n"]
PATTERN = r"[0-9]{3}-[a-z]{2,4}"
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "ok": {"type": "boolean"},
                         "kind": {"enum": ["red", "green", 7]},
                         "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,3}$"},
                                  "maxItems": 2}},
          "required": ["name", "ok", "kind", "tags"]}


@pytest.fixture(scope="module")
def pair():
    return js.load_default()


@pytest.fixture(scope="module")
def regex_constraint(pair):
    return js.Constraint.regex(PATTERN, pair[0])


def _finished(out, stop_tokens):
    """Every row ended on a stop token (so its text is a complete match, not a cut prefix)."""
    return all(row[n - 1] in stop_tokens for row, n in zip(out.tokens, out.lengths))


@pytest.fixture(scope="module")
def regex_greedy(pair, regex_constraint):
    return js.generate(pair[0], PROMPTS, max_new_tokens=16, constraint=regex_constraint)


def test_regex_outputs_match(pair, regex_constraint, regex_greedy):
    sampled = js.generate(pair[0], PROMPTS * 2, max_new_tokens=16, constraint=regex_constraint,
                          sampling=js.Sampling(temperature=1.0), seed=1)
    stops = set(np.asarray(regex_constraint.stop_tokens).tolist())
    for out in (regex_greedy, sampled):
        assert _finished(out, stops)
        assert all(re.fullmatch(PATTERN, t) for t in out.texts), out.texts
    assert len(set(sampled.texts)) > 2    # sampling is not collapsed onto one match


def test_regex_greedy_speculative_is_constrained_greedy(pair, regex_constraint, regex_greedy):
    out = js.generate(pair[0], PROMPTS, max_new_tokens=16, constraint=regex_constraint,
                      drafter=js.DraftModel(pair[1], num_tokens=4))
    np.testing.assert_array_equal(out.tokens, regex_greedy.tokens)
    np.testing.assert_array_equal(out.lengths, regex_greedy.lengths)


def test_json_schema_outputs_validate(pair):
    target, draft = pair
    c = js.Constraint.json_schema(SCHEMA, target)
    stops = set(np.asarray(c.stop_tokens).tolist())
    for drafter in (None, js.PromptLookup(ngram=2, num_tokens=4)):
        out = js.generate(target, ["{"] * 4 + PROMPTS, max_new_tokens=96, constraint=c,
                          drafter=drafter, sampling=js.Sampling(temperature=0.8), seed=2)
        assert _finished(out, stops), out.texts
        for text in out.texts:
            jsonschema.validate(json.loads(text), SCHEMA)


def test_new_pattern_of_the_same_bucket_does_not_recompile(pair, regex_constraint, regex_greedy):
    target, _ = pair
    before = COMPILATIONS["autoregressive"]
    other = js.Constraint.regex(r"(yes|no)!", target)
    assert other.next_state.shape == regex_constraint.next_state.shape
    out = js.generate(target, PROMPTS, max_new_tokens=16, constraint=other)
    assert COMPILATIONS["autoregressive"] == before
    assert all(t in ("yes!", "no!") for t in out.texts), out.texts


def test_token_arrays_inside_jit(pair, regex_constraint):
    """The pure token function takes the constraint as a traced argument."""
    import jax
    import jax.numpy as jnp

    target, _ = pair
    ids = target.tokenizer("x = ")["input_ids"]
    stops = regex_constraint.stop_tokens
    run = jax.jit(lambda m, c, t, n: js.autoregressive_tokens(
        m, t, n, 16, js.Sampling(), jax.random.PRNGKey(0), c.stop_tokens, constraint=c))
    out = run(target.replace(tokenizer=None), regex_constraint, jnp.asarray([ids], jnp.int32),
              jnp.asarray([len(ids)], jnp.int32))
    n = int(out.lengths[0])
    assert int(out.tokens[0, n - 1]) in np.asarray(stops)
    assert re.fullmatch(PATTERN, target.tokenizer.decode(np.asarray(out.tokens[0, :n - 1])))


# -- bad input ----------------------------------------------------------------------------------

def test_invalid_regex(words):
    with pytest.raises(ValueError, match=r"invalid regular expression '\[a-': outlines-core cannot build"):
        js.Constraint.regex("[a-", words, stop_tokens=[STOP])
    with pytest.raises(ValueError, match="pattern must be a regular expression string"):
        js.Constraint.regex(3, words, stop_tokens=[STOP])


@pytest.mark.parametrize("pattern", ["z+", "az"])
def test_tokenizer_cannot_express_the_pattern(words, pattern):
    with pytest.raises(ValueError, match=re.escape(f"the tokenizer cannot express the regex "
                                                   f"'{pattern}'") + r'.*any of \["z"\]'):
        js.Constraint.regex(pattern, words, stop_tokens=[STOP])     # no token spells "z"


@pytest.mark.parametrize("schema, message", [
    ({"enum": []}, "unsatisfiable JSON schema: it admits no JSON value"),
    (False, "unsatisfiable JSON schema: `false` admits no value"),
    ({"type": "string", "minLength": 5, "maxLength": 2},
     "unsatisfiable or unsupported JSON schema: .*maxLength must be greater than or equal to minLength"),
    ({"type": "integer", "minimum": 3}, "uses /minimum, which outlines-core does not enforce"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "allOf with 2 subschemas"),
    ({"type": "nonsense"}, "invalid JSON schema: 'nonsense' is not valid"),
    ("{not json", "schema is not valid JSON text"),
])
def test_bad_schemas(pair, schema, message):
    with pytest.raises(ValueError, match=message):
        js.Constraint.json_schema(schema, pair[0])


def test_unenforced_keywords_can_be_accepted(pair):
    schema = {"type": "object", "properties": {"minimum": {"type": "boolean"}}}   # a name, not a keyword
    js.Constraint.json_schema(schema, pair[0])
    c = js.Constraint.json_schema({"type": "integer", "maximum": 9}, pair[0], allow_unenforced=True)
    assert c.num_states > 1


def test_state_budget(pair):
    with pytest.raises(ValueError, match=r"needs a DFA of \d+ states over this vocabulary, more than "
                                         r"the state budget max_states=50 \(its table would be \d+ x "
                                         r"8192 int32 = \d+ MiB\)"):
        js.Constraint.regex("[a-z]{0,60}", pair[0], max_states=50)
    with pytest.raises(ValueError, match="max_states must be an integer >= 1"):
        js.Constraint.regex("a", pair[0], max_states=0)


def test_stop_tokens_and_tokenizers(words, pair):
    with pytest.raises(ValueError, match="needs a stop token"):
        js.Constraint.regex("a", words)                  # the word tokenizer has no eos
    with pytest.raises(ValueError, match=r"stop token 99 is outside the vocabulary \[0, 10\)"):
        js.Constraint.regex("a", words, stop_tokens=[99])
    with pytest.raises(ValueError, match="tokenizer must be a Hugging Face tokenizer or a js.Model"):
        js.Constraint.regex("a", "gpt2")
    with pytest.raises(ValueError, match="this model has no tokenizer"):
        js.Constraint.regex("a", pair[0].replace(tokenizer=None))


def test_generate_refuses_a_bad_constraint(pair, words):
    target, _ = pair
    with pytest.raises(ValueError, match="constraint must be None or a js.Constraint"):
        js.generate(target, PROMPTS, max_new_tokens=4, constraint="[0-9]+")
    wide = js.Constraint.regex("a", words, stop_tokens=[STOP], vocab_size=9000)
    with pytest.raises(ValueError, match="built for a vocabulary of 9000 tokens but the model has 8192"):
        js.generate(target, PROMPTS, max_new_tokens=4, constraint=wide)


def test_missing_outlines_core_names_the_install_command(monkeypatch, words):
    monkeypatch.setitem(sys.modules, "outlines_core", None)      # import fails as if absent
    with pytest.raises(ImportError, match=r'pip install "jaxspec\[constraints\]"'):
        js.Constraint.regex("a", words, stop_tokens=[STOP])
    with pytest.raises(ImportError, match="needs the optional dependency outlines-core"):
        js.Constraint.json_schema({"type": "boolean"}, words, stop_tokens=[STOP])


def test_token_bytes_byte_level(pair):
    """Byte-level BPE: "Ġ" is a space; every byte-level token is placed."""
    tok = pair[0].tokenizer
    table = constraints.token_bytes(tok)
    space_x = tok.convert_tokens_to_ids("Ġx") if "Ġx" in tok.get_vocab() else None
    if space_x is not None:
        assert table[space_x] == b" x"
    assert 0 not in table                                  # <|endoftext|> is special
    assert len(table) == len(tok) - 1
