"""Self-instruct and passage prompts (jaxspec/train/prompts.py): deterministic, filtered, and
free of the held-out benchmark prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxspec.train import prompts


def test_request_list_prompts_are_seeded_numbered_lists():
    a, b = prompts.request_list_prompts(3, seed=4), prompts.request_list_prompts(3, seed=4)
    assert a == b and a != prompts.request_list_prompts(3, seed=5)
    for text in a:
        assert text.endswith("\n5.") and text.count("\n1. ") == 1
        shown = [line[3:] for line in text.splitlines() if line[:1].isdigit() and line[3:]]
        assert len(shown) == 4 and set(shown) <= set(prompts.EXAMPLE_REQUESTS)


def test_parse_listed_requests_filters_and_dedups():
    seen = set()
    text = (" How can I fix a squeaky door hinge?\n6. ok?\n7. What is 2 + 2\n8. 42 is the answer.\n"
            "9. How can I fix a squeaky door hinge?\n10. " + prompts.EXAMPLE_REQUESTS[0] + "\n"
            "11. Write a haiku about the sea.\n\nUnrelated trailing text that is long enough?")
    got = prompts.parse_listed_requests(text, seen)
    assert got == ["How can I fix a squeaky door hinge?", "Write a haiku about the sea."]
    assert prompts.parse_listed_requests(" How can I fix a squeaky door hinge?", seen) == []


def test_passage_prompts_cover_three_tasks_and_refuse_no_passages():
    passages = ["Bees live in colonies. A colony has one queen and many workers. Workers "
                "collect nectar and pollen, and they build the comb from wax."]
    convs = prompts.passage_prompts(passages, 6, seed=1)
    assert convs == prompts.passage_prompts(passages, 6, seed=1)
    texts = [c[0]["content"] for c in convs]
    assert sum(t.startswith(tuple(prompts.SUMMARY_INSTRUCTIONS)) for t in texts) == 2
    assert sum(t.startswith("Answer the question using") for t in texts) == 2
    assert sum(t.startswith("Translate the following English text") for t in texts) == 2
    with pytest.raises(ValueError, match="passage_prompts needs at least one passage"):
        prompts.passage_prompts([], 3)


def test_no_benchmark_prompt_among_the_examples():
    bench = Path(__file__).resolve().parents[2] / "jaxspec/bench/prompts/specbench_like.jsonl"
    held = {json.loads(l)["messages"][0]["content"] for l in bench.read_text().splitlines() if l}
    assert not held & set(prompts.EXAMPLE_REQUESTS)
    assert not held & {c[0]["content"] for c in prompts.build_prompts(200)}
