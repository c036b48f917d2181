"""Reading data (jaxspec/train/reading.py): local texts as assistant answers, mixed from four
sources, deterministic, never jaxspec's own files, unknown sources refused."""

from __future__ import annotations

import ast
import random
import re

import pytest

from jaxspec.train import reading

TEMPLATES = {"docstring": reading._DOC_QUESTIONS, "readme": reading._README_QUESTIONS,
             "reference": reading._REFERENCE_QUESTIONS, "code": reading._CODE_QUESTIONS}


def source_of(question: str) -> str:
    """Which source's question templates produced `question` (exactly one must)."""
    hits = {name for name, templates in TEMPLATES.items() for t in templates
            if re.fullmatch(re.sub(r"\\\{[ndh]\\\}", ".+", re.escape(t)), question, re.DOTALL)}
    assert len(hits) == 1, (question, hits)
    return hits.pop()


@pytest.fixture(scope="module")
def convs():
    return reading.reading_conversations(24, seed=3)


def test_conversations_are_user_then_assistant_and_seeded(convs):
    assert len(convs) == 24
    assert convs == reading.reading_conversations(24, seed=3)
    assert convs != reading.reading_conversations(24, seed=4)
    for conv in convs:
        assert [t["role"] for t in conv] == ["user", "assistant"]
        assert conv[0]["content"].strip() and len(conv[1]["content"]) >= 200


def test_every_source_gives_its_share(convs):
    want = reading.source_counts(24)
    assert sum(want.values()) == 24 and all(v > 0 for v in want.values())
    got = {s: 0 for s in reading.SOURCES}
    for question, answer in ((c[0]["content"], c[1]["content"]) for c in convs):
        got[source_of(question)] += 1
        if source_of(question) == "code":  # a whole, parseable function in a fenced block
            assert answer.startswith("Here is an implementation:\n\n```python\ndef ")
            ast.parse(answer.split("```python\n", 1)[1].rsplit("\n```", 1)[0])
    assert got == want


def test_source_counts_add_up():
    assert reading.source_counts(3, ("code", "reference")) == {"code": 2, "reference": 1}
    for n in (1, 7, 10, 99):
        assert sum(reading.source_counts(n).values()) == n


def test_sources_can_be_chosen_and_unknown_ones_are_refused():
    only_code = reading.reading_conversations(5, seed=0, sources=("code",))
    assert len(only_code) == 5 and {source_of(c[0]["content"]) for c in only_code} == {"code"}
    with pytest.raises(ValueError, match=r"unknown reading source\(s\) \['wiki'\]; choose from"):
        reading.reading_conversations(5, sources=("code", "wiki"))


def test_never_reads_jaxspec_files():
    files = reading._python_files(random.Random(0))
    assert files and not any(part.startswith("jaxspec") for root, p in files
                             for part in p.relative_to(root).parts)


def test_sections_split_markdown_and_rst_headings():
    text = "Intro line.\n\n# Install\npip install x\n\nUsage\n-----\nCall it.\n\n## Notes\nNone."
    assert reading._sections(text) == [("overview", "Intro line."), ("Install", "pip install x"),
                                       ("Usage", "Call it."), ("Notes", "None.")]
