"""The colab/ notebooks: executed end to end with small settings, their key outputs checked.

Each notebook has one cell tagged `parameters`; like papermill, the test inserts a cell after it
that assigns the overrides below, then runs the notebook in a fresh kernel (nbclient) with a
temporary working directory and jaxspec cache. A failing cell fails the test with its traceback.

Also: every notebook in the repository is committed with its outputs stripped (no outputs, no
execution counts), and colab/*.ipynb are exactly what colab/build_notebooks.py writes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
COLAB = ROOT / "colab"
CELL_TIMEOUT_S = 400

# Small settings: each notebook runs in well under two minutes on 2 CPU cores.
OVERRIDES = {
    "01_quickstart.ipynb": dict(MODEL="tiny", INSTALL_SMOLLM2=False, MAX_NEW_TOKENS=48, REPEATS=2,
                                COST_SIZES=(1, 2, 4, 8), PLOT_PATH="quickstart.png"),
    "02_bring_your_model.ipynb": dict(SOURCE="local", MAX_NEW_TOKENS=32, GGUF_TYPE="F32",
                                      WORK_DIR="work"),
    "03_train_a_drafter.ipynb": dict(NUM_PROMPTS=16, ANSWER_TOKENS=64, TRAIN_STEPS=60, BATCH_SIZE=4,
                                     WINDOW=32, HEAD_TOKENS=1024, EVAL_PROMPTS=2, EVAL_TOKENS=32, REPEATS=1,
                                     WORK_DIR="work", PLOT_PATH="train.png"),
    "04_inside_your_jit.ipynb": dict(BATCH=4, PROMPT_LEN=16, MAX_NEW_TOKENS=16, STEPS=3),
    "05_sharding_and_pods.ipynb": dict(DATA=4, MODEL_AXIS=2, BATCH=8, MAX_NEW_TOKENS=16,
                                       RUN_LAUNCHER=True, WORK_DIR="work"),
}


def _with_parameters(nb, overrides: dict):
    """The notebook with an `injected-parameters` cell after its `parameters` cell."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    source = nb.cells[tagged[0]].source
    for name in overrides:
        assert re.search(rf"^{name} = ", source, re.M), f"{name} is not set in the parameters cell"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, injected)
    return nb


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def execute(name: str, tmp_path: Path, monkeypatch) -> str:
    nb = nbformat.read(COLAB / name, as_version=4)
    nb = _with_parameters(nb, OVERRIDES[name])
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "jaxspec_cache"))  # no user cost tables
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Skipping LLVM's expensive passes roughly halves XLA:CPU compile time, which dominates
    # these small runs (as in tests/test_sharding.py); printed speeds are not asserted.
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    start = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = _text(nb)
    print(f"{name}: {time.perf_counter() - start:.0f}s; slowest cells: {_slowest(nb)}\n{text[-3000:]}")
    return text


def _slowest(nb, count: int = 4) -> str:
    from datetime import datetime

    times = []
    for i, cell in enumerate(nb.cells):
        ex = cell.metadata.get("execution", {})
        if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
            span = (datetime.fromisoformat(ex["shell.execute_reply"].replace("Z", "+00:00"))
                    - datetime.fromisoformat(ex["iopub.execute_input"].replace("Z", "+00:00")))
            times.append((span.total_seconds(), i))
    return ", ".join(f"cell {i} {t:.0f}s" for t, i in sorted(times, reverse=True)[:count])


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no output matching {pattern!r} in:\n{text[-3000:]}"
    return float(match.group(1))


def test_01_quickstart(tmp_path, monkeypatch):
    text = execute("01_quickstart.ipynb", tmp_path, monkeypatch)
    assert "greedy outputs identical: True" in text
    assert _number(r"speedup: (\d+\.\d+)x", text) > 0
    assert "drafter: DraftModel" in text
    assert (tmp_path / "quickstart.png").stat().st_size > 10_000


def test_02_bring_your_model(tmp_path, monkeypatch):
    text = execute("02_bring_your_model.ipynb", tmp_path, monkeypatch)
    assert "source: local" in text
    assert "draft model: identical to autoregressive: True" in text
    assert "prompt lookup: identical to autoregressive: True" in text
    assert "jaxspec == transformers greedy: True" in text
    assert _number(r"speedup \(.*\): (\d+\.\d+)x", text) > 0
    assert "GGUF tokenizer encodes the prompts like the original: True" in text
    assert "GGUF == HF greedy: True" in text          # an F32 file: exactly the same model
    assert list((tmp_path / "work").glob("*.gguf"))


def test_03_train_a_drafter(tmp_path, monkeypatch):
    text = execute("03_train_a_drafter.ipynb", tmp_path, monkeypatch)
    assert "first run stopped at step 30; checkpoints at steps [15]" in text
    assert "resumed and finished at step 60" in text
    match = re.search(r"loss: (\d+\.\d+) -> (\d+\.\d+)", text)
    assert match and float(match.group(2)) < float(match.group(1)), text[-3000:]
    assert "greedy outputs identical: True" in text
    assert _number(r"trained eagle .*speedup: (\d+\.\d+)x", text) > 0
    assert (tmp_path / "work" / "my_eagle" / "model.safetensors").is_file()
    assert (tmp_path / "train.png").stat().st_size > 10_000


def test_04_inside_your_jit(tmp_path, monkeypatch):
    text = execute("04_inside_your_jit.ipynb", tmp_path, monkeypatch)
    assert len(re.findall(r"^step \d: loss -?\d", text, re.M)) == 3
    assert "compilations: 1" in text                # three steps, new prompts, one program
    assert "inside-jit speculative == inside-jit autoregressive: True" in text
    assert "inside-jit greedy == js.generate: True" in text


def test_05_sharding_and_pods(tmp_path, monkeypatch):
    text = execute("05_sharding_and_pods.ipynb", tmp_path, monkeypatch)
    assert "devices: 8 x cpu" in text
    assert "identical on mesh 4x2: True" in text
    assert "refused: mesh axis 'model' has size 4, which does not divide num_kv_heads=2" in text
    assert "restored checkpoint gives the same tokens: True" in text
    assert "jaxspec.launch: 4 prompts" in text
    assert len((tmp_path / "work" / "results.jsonl").read_text().splitlines()) == 4


# -- the committed files ------------------------------------------------------------------------

def _repository_notebooks() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=ROOT, capture_output=True,
                             text=True)
    found = {ROOT / p for p in tracked.stdout.split()} if tracked.returncode == 0 else set()
    found |= set(COLAB.glob("*.ipynb"))
    return sorted(p for p in found if p.is_file())


def test_every_notebook_in_colab_is_executed_here():
    assert sorted(p.name for p in COLAB.glob("*.ipynb")) == sorted(OVERRIDES)


def test_notebooks_are_stripped():
    notebooks = _repository_notebooks()
    assert len(notebooks) >= len(OVERRIDES)
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                where = f"{path.relative_to(ROOT)} cell {i}"
                assert cell.outputs == [], f"{where} has outputs: strip them"
                assert cell.execution_count is None, f"{where} has an execution count"


def test_notebooks_match_their_generator():
    result = subprocess.run([sys.executable, str(COLAB / "build_notebooks.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
