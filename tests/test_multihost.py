"""Two processes x 4 CPU devices on localhost (jax.distributed + gloo collectives) running
`python -m jaxspec.launch` write exactly what one process on one device writes.

The mesh is data=2 x model=4: tensor parallelism inside each process, the batch split across
the two processes (each tokenizes only its rows; 7 prompts, so one padding row is dropped).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoints(tmp: Path):
    import jax

    import jaxspec as js
    from jaxspec.models.config import ModelConfig
    from jaxspec.models.transformer import create

    config = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=2, num_heads=8,
                         num_kv_heads=4, head_dim=8, intermediate_size=128,
                         max_position_embeddings=128, norm_eps=1e-5)
    target = create(config, 7)
    params = dict(target.params)
    params["layers"] = jax.tree_util.tree_map(lambda x: x[:1], params["layers"])
    draft = js.Model(config=ModelConfig(**{**config.__dict__, "num_layers": 1}), params=params)
    js.save(target, tmp / "target")
    js.save(draft, tmp / "draft")
    rng = np.random.default_rng(1)
    with open(tmp / "prompts.txt", "w") as f:
        for i in range(7):
            base = [int(t) for t in rng.integers(0, 64, size=3)]
            f.write(json.dumps((base * 3)[:3 + i]) + "\n")


def test_two_processes_match_one_process(tmp_path):
    _checkpoints(tmp_path)
    common = [sys.executable, "-m", "jaxspec.launch", "--prompts", str(tmp_path / "prompts.txt"),
              "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
              "--drafter", "draft", "--num-tokens", "3", "--max-new-tokens", "12"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true").strip()
    port = _free_port()
    runs = {"single": common + ["--out", str(tmp_path / "single.jsonl"), "--no-distributed",
                                "--data", "1", "--model", "1"]}
    for i in range(2):
        runs[f"process{i}"] = common + [
            "--out", str(tmp_path / "multi.jsonl"), "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", "2", "--process-id", str(i), "--cpu-devices", "4",
            "--data", "2", "--model", "4"]
    procs = {k: subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for k, cmd in runs.items()}
    logs = {}
    try:
        for k, proc in procs.items():
            logs[k], _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for k, proc in procs.items():
        assert proc.returncode == 0, f"{k} failed (rc={proc.returncode}):\n{logs.get(k, '')[-3000:]}"
    assert "2 processes, 8 devices, mesh data=2 model=4" in logs["process0"]
    single = (tmp_path / "single.jsonl").read_text().splitlines()
    multi = (tmp_path / "multi.jsonl").read_text().splitlines()
    assert len(single) == 7 and [json.loads(r)["index"] for r in multi] == list(range(7))
    assert multi == single
    assert sum(json.loads(r)["accepted"] for r in single) > 0
