"""Every ```python block of README.md and docs/*.md runs, or says why it cannot here.

Blocks are extracted from the Markdown and executed, each in a fresh namespace (nothing carries
over from the block before: a block imports what it uses), one after another in one worker
process (so blocks with the same shapes share jaxspec's compiled programs), with a time limit per
block. Tracebacks carry the Markdown file's own
line numbers, and each block is its own test (`test_block[README.md:74]`), so a failure names
the block.

A block that needs what this machine lacks says so in a comment line, with a reason:

    # needs: gpu — times the Pallas kernel on a real GPU

(`needs:` one of KNOWN_NEEDS, then an em dash or " - ", then the reason.) Such a block is
skipped with its reason; a marker without a reason, or with an unknown need, fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_TIMEOUT_S = 300
KNOWN_NEEDS = ("gpu", "tpu", "network", "package", "files", "devices", "hosts")

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"^[ \t]*#[ \t]*needs:(.*)$", re.M)
_MARKER_FULL = re.compile(r"^\s*(?P<what>[a-z]+(?:\s*,\s*[a-z]+)*)\s*(?:—|\s-\s)\s*(?P<reason>\S.*)$")


def blocks() -> list[dict]:
    """Every ```python block: id "file:line" (line of its first code line), group, code."""
    out = []
    for path in SOURCES:
        text = path.read_text()
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start(1)) + 1
            out.append({"id": f"{path.relative_to(ROOT)}:{line}", "line": line,
                        "code": match.group(1)})
    return out


BLOCKS = blocks()

_WORKER = r'''
import contextlib, io, json, signal, sys, time, traceback

class BlockTimeout(Exception):
    pass

def _alarm(signum, frame):
    raise BlockTimeout(f"block ran longer than {LIMIT}s")

blocks, out_path, LIMIT = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
signal.signal(signal.SIGALRM, _alarm)
results = {}
for block in blocks:
    start, stdout = time.perf_counter(), io.StringIO()
    # Pad with newlines so tracebacks show the Markdown file's line numbers.
    code = compile("\n" * (block["line"] - 1) + block["code"], block["id"].rsplit(":", 1)[0], "exec")
    signal.alarm(LIMIT)
    try:
        with contextlib.redirect_stdout(stdout):
            exec(code, {"__name__": "__main__"})
        result = {"ok": True}
    except BaseException:
        result = {"ok": False, "error": traceback.format_exc()[-6000:]}
    finally:
        signal.alarm(0)
    result.update(seconds=round(time.perf_counter() - start, 1), stdout=stdout.getvalue()[-2000:])
    results[block["id"]] = result
    print(f"{block['id']}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']}s",
          file=sys.stderr, flush=True)
    with open(out_path, "w") as f:          # after every block: a crash keeps earlier results
        json.dump(results, f)
'''


def marker(code: str):
    """(needs, reason) of a block's `# needs:` comment, None without one; ValueError if bad."""
    found = _MARKER.search(code)
    if not found:
        return None
    full = _MARKER_FULL.match(found.group(1))
    if not full or len(full.group("reason").split()) < 2:
        raise ValueError(f"'# needs:{found.group(1)}' must read '# needs: WHAT — REASON' with a "
                         f"reason of a few words (WHAT one of {', '.join(KNOWN_NEEDS)})")
    needs = [w.strip() for w in full.group("what").split(",")]
    unknown = [w for w in needs if w not in KNOWN_NEEDS]
    if unknown:
        raise ValueError(f"unknown need {unknown[0]!r} in '# needs:{found.group(1)}'; "
                         f"known: {', '.join(KNOWN_NEEDS)}")
    return needs, full.group("reason").strip()


def _runnable() -> list[dict]:
    out = []
    for b in BLOCKS:
        try:
            skip = marker(b["code"]) is not None
        except ValueError:
            skip = True             # reported by its own test
        if not skip:
            out.append(b)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """({block id: {ok, seconds, stdout, error}}, the worker's output) for every runnable block."""
    tmp = tmp_path_factory.mktemp("docs")
    todo = _runnable()
    (tmp / "blocks.json").write_text(json.dumps(todo))
    (tmp / "worker.py").write_text(_WORKER)
    work = tmp / "cwd"
    work.mkdir()
    env = dict(os.environ, JAXSPEC_CACHE=str(tmp / "cache"), HF_HUB_OFFLINE="1",
               MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    # Compile time dominates these short blocks: skip LLVM's expensive passes (as the sharding
    # tests do). Nothing here asserts a speed.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true").strip()
    result_path = tmp / "results.json"
    try:
        proc = subprocess.run([sys.executable, str(tmp / "worker.py"), str(tmp / "blocks.json"),
                               str(result_path), str(BLOCK_TIMEOUT_S)],
                              cwd=work, env=env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S * len(todo) + 60)
        log = proc.stdout[-3000:] + proc.stderr[-3000:]
    except subprocess.TimeoutExpired as e:
        log = f"worker timed out: {e}"
    return (json.loads(result_path.read_text()) if result_path.exists() else {}), log


def test_there_are_blocks_to_run():
    assert len(BLOCKS) >= 6
    assert len([b for b in _runnable() if b["id"].startswith("docs/")]) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[b["id"] for b in BLOCKS])
def test_block(block, results):
    needs = marker(block["code"])          # a malformed marker fails here, with the rule
    if needs is not None:
        pytest.skip(f"needs {', '.join(needs[0])}: {needs[1]}")
    ran, log = results
    if block["id"] not in ran:
        pytest.fail(f"{block['id']} did not finish (the worker crashed or timed out before "
                    f"it reported):\n{log}")
    result = ran[block["id"]]
    assert result["ok"], f"{block['id']} failed after {result['seconds']}s:\n{result['error']}"
    print(f"{block['id']}: {result['seconds']}s")


def test_marker_rules():
    assert marker("x = 1\n") is None
    assert marker("# needs: gpu — times the kernel on a GPU\n") == (["gpu"], "times the kernel on a GPU")
    assert marker("# needs: network, package - downloads the model from the Hub\n")[0] == \
        ["network", "package"]
    for bad in ("# needs: gpu\n", "# needs: gpu — fast\n", "# needs: quantum — a real computer\n"):
        with pytest.raises(ValueError):
            marker(bad)
