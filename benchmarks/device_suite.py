"""The device suite: one call that proves and times jaxspec on a GPU (an H200) in under 8 minutes.

    PYTHONPATH=. python benchmarks/device_suite.py                  # on the GPU machine
    PYTHONPATH=. python benchmarks/device_suite.py --smoke --out /tmp/suite   # any CPU, < 1 min
    PYTHONPATH=. python benchmarks/device_suite.py --steps 2,4      # rerun some steps only

Steps, in order, each with its own wall-clock budget (a step that finishes early hands its
unused time to the next; the defaults add up to 425 s):

1. environment: device, memory, jax / jaxlib / torch / transformers versions, backend, and two
   measured ceilings (a bfloat16 matrix product's TFLOP/s, a device copy's GB/s).
2. tree_attention: the Pallas tree-attention kernel compiled for the GPU (Triton lowering),
   its max error against `tree_attention_reference` and the XLA path over
   `gpu_tree_attention.CHECK_CASES` (T in {1, 4, 16, 64}, ragged lengths, GQA groups, bfloat16
   and float32, the shipped tiling and forced split-K), then kernel vs XLA attention time at
   committed lengths 1k, 4k, 16k, 32k for batch 1 and 8 (`gpu_tree_attention.bench_shape`).
3. cost_curves: target-forward ms for T = 1, 2, 4, 8, 16, 32, 64 new tokens against a 1k-token
   cache (`jaxspec.speculative.costs.measure`), bfloat16 random weights of real shapes
   (SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B), XLA and Pallas attention; then the PROJECTED GPU
   speedup of every SmolLM2 method: these GPU curves combined with the acceptance measured on
   CPU (`benchmarks/bench_smollm2_cpu_{chat18,chat,methods}.json`; a copy of the numbers is
   bundled here in case the files are absent). A projection, not a measurement.
4. end_to_end: jaxspec autoregressive vs transformers `generate` on the same random weights at
   the Llama-3.2-1B shape (bfloat16, greedy, 128 new tokens, batch 1 and 8; tokens compared, the
   first mismatch reported), then the shipped tiny pair's drafters on the GPU (speedup over
   autoregressive, mean accepted, identical outputs).

Results go to OUT/device_suite.json and OUT/device_suite.md (OUT: --out, else $OUT, else
./device_suite_out), rewritten after every sub-measurement, so a run cut off at any point
still leaves what it measured. A step that raises is recorded with its traceback and the next
one runs; a sub-measurement that raises (a kernel tiling that does not compile, say) is recorded
as a row with its error and the step goes on. Exit status 0 when no step failed.

Nothing is downloaded and nothing needs `gguf`: the models are random weights of real shapes
(`jaxspec.ModelConfig`) and the tiny pair in `jaxspec/assets`. --smoke runs every step on CPU
(JAX_PLATFORMS=cpu, the kernel in interpret mode) at toy sizes; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "benchmarks"):  # jaxspec, pallas_kernels, gpu_tree_attention
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# -- what the steps run ------------------------------------------------------------------------

STEPS = ("environment", "tree_attention", "cost_curves", "end_to_end")
TITLES = {"environment": "1. Environment",
          "tree_attention": "2. Pallas tree attention on the device",
          "cost_curves": "3. Target-forward cost curves and the projected speedups",
          "end_to_end": "4. End to end"}
BUDGETS_S = {"environment": 15, "tree_attention": 125, "cost_curves": 125, "end_to_end": 160}
SMOKE_BUDGETS_S = {"environment": 10, "tree_attention": 40, "cost_curves": 40, "end_to_end": 60}
HARD_GRACE_S = 5  # a step still running this long after its budget is interrupted

# Random-weight models of real shapes (ModelConfig fields). SmolLM2-135M: the shipped Eagle's
# target (134,515,008 parameters); Llama-3.2-1B and Llama-3.1-8B as their config.json say.
SHAPES = {
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                         max_position_embeddings=8192, norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(family="llama", vocab_size=128256, hidden_size=2048, num_layers=16,
                         num_heads=32, num_kv_heads=8, head_dim=64, intermediate_size=8192,
                         max_position_embeddings=131072, norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=("llama3", 32.0, 1.0, 4.0, 8192),
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                         max_position_embeddings=131072, norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=("llama3", 8.0, 1.0, 4.0, 8192),
                         tie_word_embeddings=False),
}
# --smoke: the same families and features (GQA groups 3 / 4 / 4, llama3 rope scaling, tied and
# untied heads) at toy sizes.
SMOKE_SHAPES = {
    "smollm2-135m": dict(SHAPES["smollm2-135m"], vocab_size=256, hidden_size=48, num_layers=1,
                         num_heads=3, num_kv_heads=1, head_dim=16, intermediate_size=96),
    "llama-3.2-1b": dict(SHAPES["llama-3.2-1b"], vocab_size=256, hidden_size=64, num_layers=2,
                         num_heads=8, num_kv_heads=2, head_dim=16, intermediate_size=128,
                         max_position_embeddings=4096, rope_scaling=("llama3", 32.0, 1.0, 4.0, 64)),
    "llama-3.1-8b": dict(SHAPES["llama-3.1-8b"], vocab_size=256, hidden_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=1, head_dim=16, intermediate_size=128,
                         max_position_embeddings=4096, rope_scaling=("llama3", 8.0, 1.0, 4.0, 64)),
}
E2E_SHAPE = "llama-3.2-1b"

COST_SIZES = (1, 2, 4, 8, 16, 32, 64)
COST_CACHE_LEN = 1024
SMOKE_COST_SIZES = (1, 4)
SMOKE_COST_CACHE_LEN = 64

# Kernel timing shapes (batch, committed length, T), most important first: the goal is
# T = 64 at >= 4k, so those come before the 1k and the decode (T = 1) and chain (T = 8) rows.
TIMING_SHAPES = tuple((b, c, t) for t in (64, 1, 8) for c in (4096, 16384, 32768, 1024)
                      for b in (1, 8))
SMOKE_TIMING_SHAPES = ((2, 64, 8),)
GOAL_KERNEL_SPEEDUP = 1.5   # Pallas vs XLA at >= 4k, T = 64
GOAL_HF_SPEEDUP = 1.5       # jaxspec AR vs transformers at the 1B shape, batch 1

# The tiny pair's methods on the device, most telling first (harness.method_table's names).
TINY_PAIR_METHODS = ("autoregressive", "draft_model_k3", "draft_model_k5", "prompt_lookup",
                     "draft_model_tree28", "draft_model_dynamic32", "token_recycling_80",
                     "prompt_lookup_tree", "draft_model_auto")
SMOKE_TINY_PAIR_METHODS = ("autoregressive", "draft_model_k3")

# Acceptance measured on CPU for SmolLM2-135M-Instruct (greedy, batch 1, 128 new tokens): the
# committed benchmark files are read when present; this copy of their numbers is the fallback.
# Per run: its CPU cost curve (ms for T new tokens, 256-token cache) and, per method, (mean
# accepted per round, measured speedup over autoregressive). chat18 measured the shipped
# drafters as they are now (the retrained Eagle, the Medusa heads); chat and methods measured
# the Eagle shipped before it, and the training-free methods.
CPU_FIGURES_FILES = ("bench_smollm2_cpu_chat18.json", "bench_smollm2_cpu_chat.json",
                     "bench_smollm2_cpu_methods.json")
BUNDLED_CPU_FIGURES = {
    "bench_smollm2_cpu_chat18.json": dict(
        cost_curve_ms={1: 36.17, 2: 47.81, 4: 52.67, 8: 63.15, 16: 77.34, 32: 103.05, 64: 135.14},
        methods={"prompt_lookup": (0.5955, 0.9762), "eagle_k2": (0.4332, 0.9767),
                 "eagle_k3": (0.4541, 0.9452), "eagle_k3_fixed": (0.5075, 0.8916),
                 "medusa_tree": (0.2484, 0.9008), "medusa_k2": (0.2633, 0.9292)}),
    "bench_smollm2_cpu_chat.json": dict(
        cost_curve_ms={1: 37.10, 2: 41.51, 4: 50.07, 8: 63.43, 16: 68.24, 32: 93.16, 64: 122.77},
        methods={"prompt_lookup": (0.5311, 0.9684), "eagle_k3": (0.3925, 0.9178),
                 "eagle_k3_fixed": (0.4298, 0.8474)}),
    "bench_smollm2_cpu_methods.json": dict(
        cost_curve_ms={1: 36.34, 2: 43.47, 4: 50.19, 8: 64.03, 16: 77.16, 32: 104.40,
                       64: 135.58},
        methods={"prompt_lookup_tree": (0.4582, 0.7123), "token_recycling_80": (0.9426, 0.3555),
                 "eagle_k2": (0.4163, 0.9567), "eagle_k5": (0.4317, 0.8574),
                 "eagle_tree": (0.5289, 0.8079), "eagle_k3_v4096": (0.4348, 0.9314),
                 "eagle_k3_v2048": (0.4386, 0.9457)}),
}
# Nodes each SmolLM2 method verifies per round, root included (chat_bench.method_table's
# drafters with the shipped Eagle and Medusa; a test checks these against the drafters).
VERIFY_NODES = {"prompt_lookup": 9, "prompt_lookup_tree": 33, "token_recycling_80": 81,
                "eagle_k2": 3, "eagle_k3": 4, "eagle_k3_fixed": 4, "eagle_k5": 6,
                "eagle_tree": 9, "eagle_k3_v4096": 4, "eagle_k3_v2048": 4,
                "medusa_tree": 10, "medusa_k2": 3, "medusa_tree_fixed": 10}


# -- the report: JSON + Markdown, rewritten after every sub-measurement -------------------------

class StepTimeout(BaseException):
    """A step ran past its budget (BaseException: a step's own `except Exception` lets it by)."""


class Terminated(BaseException):
    """SIGTERM (the caller's time limit): record what is there, then stop."""


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) < 0.01:
            return f"{value:.2e}"
        return f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(value).replace("|", "/").replace("\n", " ")


def markdown_table(rows: list[dict]) -> list[str]:
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return lines


class Report:
    """device_suite.json / .md under out_dir; `flush` rewrites both (atomically)."""

    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out_dir / "device_suite.json"
        self.md_path = self.out_dir / "device_suite.md"
        self.data = dict(meta=meta, steps={})
        self._start = time.monotonic()
        self._step_start = {}

    def begin(self, key: str, budget: float) -> dict:
        self.data["steps"][key] = dict(title=TITLES[key], status="running",
                                       budget_s=round(budget, 1), elapsed_s=0.0, tables={},
                                       notes=[], error=None, row_errors=[])
        self._step_start[key] = time.monotonic()
        self.flush()
        return self.data["steps"][key]

    def add(self, key: str, table: str, row: dict) -> None:
        self.data["steps"][key]["tables"].setdefault(table, []).append(row)
        self.flush()

    def set_table(self, key: str, table: str, rows: list[dict]) -> None:
        self.data["steps"][key]["tables"][table] = rows
        self.flush()

    def note(self, key: str, text: str) -> None:
        self.data["steps"][key]["notes"].append(text)
        print(f"  [{key}] {text}", flush=True)
        self.flush()

    def end(self, key: str, status: str, error: str | None = None) -> None:
        step = self.data["steps"][key]
        step["elapsed_s"] = round(time.monotonic() - self._step_start[key], 1)
        step["status"], step["error"] = status, error
        self.flush()

    def flush(self) -> None:
        for key, start in self._step_start.items():
            step = self.data["steps"][key]
            if step["status"] == "running":
                step["elapsed_s"] = round(time.monotonic() - start, 1)
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - self._start, 1)
        self.data["meta"]["updated"] = _now()
        for path, text in ((self.json_path, json.dumps(self.data, indent=1, default=str) + "\n"),
                           (self.md_path, self.markdown())):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    def markdown(self) -> str:
        meta = self.data["meta"]
        lines = [f"# jaxspec device suite on {meta.get('device', '?')}"
                 + (" (smoke run: CPU, toy sizes, timings meaningless)" if meta.get("smoke")
                    else ""), "",
                 ", ".join(f"{k}: {_fmt(v)}" for k, v in meta.items() if k != "device"), ""]
        for key, step in self.data["steps"].items():
            lines += [f"## {step['title']}", "",
                      f"status: **{step['status']}**, {step['elapsed_s']} s of a "
                      f"{step['budget_s']} s budget", ""]
            for note in step["notes"]:
                lines += [f"- {note}"]
            if step["notes"]:
                lines.append("")
            for name, rows in step["tables"].items():
                if name.startswith("_") or not rows:
                    continue  # long-form tables live in the JSON only
                lines += [f"### {name}", ""] + markdown_table(rows) + [""]
            for err in step["row_errors"]:
                lines += ["<details><summary>sub-measurement error</summary>", "", "```",
                          err.strip(), "```", "</details>", ""]
            if step["error"]:
                lines += ["Step error:", "", "```", step["error"].strip(), "```", ""]
        return "\n".join(lines) + "\n"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class Step:
    """What a step function gets: its deadline, its slice of the report, shared results."""

    report: Report
    key: str
    deadline: float
    smoke: bool
    args: argparse.Namespace
    shared: dict
    skipped: list = dataclasses.field(default_factory=list)
    errors: int = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, table: str, row: dict) -> None:
        self.report.add(self.key, table, row)
        shown = {k: v for k, v in row.items() if not isinstance(v, (list, dict))}
        print(f"  [{self.key}/{table}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()),
              flush=True)

    def set_table(self, table: str, rows: list[dict]) -> None:
        self.report.set_table(self.key, table, rows)

    def note(self, text: str) -> None:
        self.report.note(self.key, text)

    def skip(self, what: str) -> None:
        """Record that the time box left `what` unmeasured."""
        self.skipped.append(what)
        self.note(f"time box: skipped {what} ({max(self.left(), 0):.0f} s left)")

    def attempt(self, table: str, row: dict, fn) -> bool:
        """row.update(fn()), or the error; then record the row. True when fn returned."""
        start = time.perf_counter()
        try:
            row.update(fn())
            ok = True
        except Exception as err:  # one sub-measurement's failure is a result
            row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
            self.errors += 1
            tb = traceback.format_exc()
            self.report.data["steps"][self.key]["row_errors"].append(tb[-6000:])
            ok = False
        row["wall_s"] = round(time.perf_counter() - start, 2)
        self.add(table, row)
        return ok


def _on_alarm(signum, frame):
    raise StepTimeout("the step ran past its time budget")


def _on_term(signum, frame):
    raise Terminated(f"signal {signum}")


def run_step(report: Report, key: str, fn, budget: float, args, shared: dict,
             finalize=None) -> str:
    """Run one step inside its time box; record its status and any traceback."""
    print(f"== {TITLES[key]} (budget {budget:.0f} s)", flush=True)
    report.begin(key, budget)
    step = Step(report, key, time.monotonic() + budget, args.smoke, args, shared)
    status, error = "ok", None
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget + HARD_GRACE_S)
    try:
        try:
            fn(step)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    except StepTimeout:
        status, error = "timeout", traceback.format_exc()[-6000:]
    except Terminated:
        report.end(key, "killed", traceback.format_exc()[-3000:])
        raise
    except Exception:
        status, error = "failed", traceback.format_exc()[-8000:]
    if finalize is not None:
        try:
            finalize(step)
        except Exception:
            error = (error or "") + "\nfinalize: " + traceback.format_exc()[-4000:]
            status = "failed" if status == "ok" else status
    if status == "ok" and step.errors:
        status = "errors"      # some sub-measurements raised; the rows say which
    elif status == "ok" and step.skipped:
        status = "partial"     # the time box cut it short
    report.end(key, status, error)
    print(f"== {key}: {status} ({report.data['steps'][key]['elapsed_s']} s)", flush=True)
    if error:
        print(error, flush=True)
    gc.collect()
    return status


# -- helpers -----------------------------------------------------------------------------------

def model_config(name: str, smoke: bool):
    from jaxspec.models.config import ModelConfig

    return ModelConfig(**(SMOKE_SHAPES if smoke else SHAPES)[name])


def random_model(config, seed: int = 0):
    """bfloat16 random weights (normal(0.02) matrices, unit norms), made on the device by one
    compiled program (op by op, every parameter shape would compile its own)."""
    import functools

    import jax
    import jax.numpy as jnp

    from jaxspec.models.transformer import Model, init_params

    init = jax.jit(functools.partial(init_params, config, dtype=jnp.bfloat16))
    params = jax.block_until_ready(init(jax.random.PRNGKey(seed)))
    return Model(config=config, params=params)


def _timed_ms(fn, iters: int) -> float:
    import jax

    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - start) / iters


def _version(package: str):
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# -- step 1: environment -----------------------------------------------------------------------

def step_environment(step: Step) -> None:
    import importlib.util

    import jax
    import jax.numpy as jnp
    import jaxlib

    device = jax.devices()[0]
    info = dict(backend=jax.default_backend(), platform=device.platform,
                device_kind=getattr(device, "device_kind", device.platform),
                device_count=jax.device_count(), jax=jax.__version__,
                jaxlib=getattr(jaxlib, "__version__", _version("jaxlib")),
                python=platform.python_version(), machine=platform.machine(),
                cpus=os.cpu_count())
    try:
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            info["jax_memory_limit_gib"] = round(stats["bytes_limit"] / 2**30, 1)
    except Exception as err:  # not every backend reports memory
        info["jax_memory_limit_gib"] = f"unavailable ({type(err).__name__})"
    for package in ("jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
                    "transformers", "safetensors", "tokenizers", "torch", "numpy", "ml_dtypes"):
        version = _version(package)
        if version is not None:
            info[package] = version
    try:  # (find_spec raises when sys.modules holds a None for it, as the smoke test sets)
        info["gguf_installed"] = importlib.util.find_spec("gguf") is not None
    except (ImportError, ValueError):
        info["gguf_installed"] = False
    for var in ("JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    if not step.smoke:
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:200]
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"unavailable ({type(err).__name__})"
        try:
            import torch

            info["torch_cuda"] = torch.cuda.is_available()
            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                info["torch_device"] = torch.cuda.get_device_name(0)
                info["torch_free_gib"] = round(free / 2**30, 1)
                info["torch_total_gib"] = round(total / 2**30, 1)
        except Exception as err:  # torch is optional here
            info["torch_cuda"] = f"unavailable ({type(err).__name__}: {err})"
    step.set_table("environment", [dict(what=k, value=v) for k, v in info.items()])
    print("  " + json.dumps(info, default=str), flush=True)
    step.shared["device"] = info["device_kind"]
    step.report.data["meta"]["device"] = info["device_kind"]

    # Ceilings, measured: a square bfloat16 matrix product and a copy-like elementwise op.
    n = 256 if step.smoke else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: x @ y)
    ms = _timed_ms(lambda: matmul(a, a), 3 if step.smoke else 20)
    step.add("ceilings", dict(what=f"bf16 matmul {n}^3", ms=round(ms, 4),
                              tflops=round(2 * n**3 / ms / 1e9, 1)))
    a = None  # free it before the copy test
    elements = (1 << 20) if step.smoke else (1 << 29)
    x = jnp.ones((elements,), jnp.bfloat16)
    bump = jax.jit(lambda v: v + 1)
    ms = _timed_ms(lambda: bump(x), 3 if step.smoke else 20)
    step.add("ceilings", dict(what=f"x + 1 over {2 * elements >> 20} MiB (read + write)",
                              ms=round(ms, 4), gb_per_s=round(4 * elements / ms / 1e6, 1)))


# -- step 2: the Pallas tree-attention kernel --------------------------------------------------

def step_tree_attention(step: Step) -> None:
    import jax

    import gpu_tree_attention as gta

    interpret = step.smoke
    if not interpret and jax.default_backend() != "gpu":
        raise RuntimeError(f"no GPU: jax's default backend is {jax.default_backend()!r} "
                           "(run with --smoke on a machine without one)")
    step.note(f"shipped GPU tiling: {dataclasses.asdict(gta.SHIPPED_CONFIGS['gpu'])}; kernel "
              f"{'in interpret mode (smoke)' if interpret else 'compiled by the Triton lowering'}"
              f"; tolerance (max abs error): {gta.CHECK_TOLERANCE}")
    if step.smoke:  # the device's own cases cannot compile here, but they can lower for CUDA
        for i, case in enumerate(gta.CHECK_CASES):
            step.attempt("cuda_lowering", dict(case=i, T=case[0], heads=f"{case[1]}/{case[2]}",
                                               head_dim=case[3], slots=case[4], batch=case[5],
                                               dtype=case[6], kwargs=case[8]),
                         lambda case=case: gta.lower_case_for_cuda(case))
    cases = gta.SMOKE_CHECK_CASES if step.smoke else gta.CHECK_CASES
    passed, ran, longest = 0, 0, 1.0
    for i, case in enumerate(cases):
        if step.left() < 2 * longest:
            step.skip(f"correctness cases {i}..{len(cases) - 1}")
            break
        start = time.perf_counter()
        ok = step.attempt("correctness", dict(case=i),
                          lambda case=case, i=i: gta.check_case(case, interpret=interpret, seed=i))
        longest = max(longest, time.perf_counter() - start)
        ran += 1
        row = step.report.data["steps"][step.key]["tables"]["correctness"][-1]
        passed += bool(ok and row.get("ok"))
    compiled = [r for r in step.report.data["steps"][step.key]["tables"].get("correctness", [])
                if "error" not in r]
    step.shared["pallas_compiles"] = bool(compiled)
    step.shared["pallas_correct"] = passed == len(cases)
    step.note(f"correctness: {passed} of {len(cases)} cases within tolerance ({ran} ran, "
              f"{len(compiled)} compiled). Adding \"gpu\" to PALLAS_VERIFIED_BACKENDS is "
              f"justified only if all passed: {'yes' if passed == len(cases) else 'NO'}.")

    if step.smoke:
        heads = dict(q_heads=8, kv_heads=2, head_dim=64)
        shapes, iters = SMOKE_TIMING_SHAPES, 2
    else:
        heads = dict(q_heads=gta.Q_HEADS, kv_heads=gta.KV_HEADS, head_dim=gta.HEAD_DIM)
        shapes, iters = TIMING_SHAPES, 50
    if not compiled:
        step.note("timing: the kernel compiled for no correctness case; XLA rows only")
    longest = 1.0
    for i, (batch, context, t) in enumerate(shapes):
        if step.left() < 1.5 * longest:
            step.skip(f"timing shapes {[s for s in shapes[i:]]}")
            break
        start = time.perf_counter()

        def measure_shape(batch=batch, context=context, t=t):
            errors = []
            rows = gta.bench_shape(batch, context, t, **heads, configs=[{}] if compiled else [],
                                   interpret=interpret, iters=iters, errors=errors)
            xla = next(r for r in rows if r.impl == "xla")
            kernel = next((r for r in rows if r.impl == "pallas"), None)
            out = dict(capacity=xla.capacity, xla_ms=xla.ms,
                       xla_err_vs_reference=xla.max_err_vs_reference)
            if kernel is not None:
                out.update(pallas_ms=kernel.ms, speedup=round(xla.ms / kernel.ms, 3),
                           pallas_kv_gb_per_s=kernel.kv_gb_per_s,
                           pallas_compile_s=kernel.compile_s,
                           pallas_err_vs_xla=kernel.max_err_vs_xla,
                           pallas_err_vs_reference=kernel.max_err_vs_reference, ok=kernel.ok)
            if errors:  # the XLA row stands; the kernel's failure makes the step "errors"
                out["pallas_error"] = errors[0][:300]
                step.errors += 1
                step.report.data["steps"][step.key]["row_errors"].append("\n".join(errors))
            return out

        step.attempt("timing", dict(batch=batch, context=context, T=t), measure_shape)
        longest = max(longest, time.perf_counter() - start)
    rows = step.report.data["steps"][step.key]["tables"].get("timing", [])
    goal = [r for r in rows if r["context"] >= 4096 and r["T"] == 64 and "speedup" in r]
    if goal:
        worst = min(r["speedup"] for r in goal)
        step.note(f"goal (Pallas >= {GOAL_KERNEL_SPEEDUP}x XLA at >= 4k context, T = 64): worst "
                  f"measured {worst:.2f}x over {len(goal)} shapes: "
                  f"{'met' if worst >= GOAL_KERNEL_SPEEDUP else 'NOT met'}")


# -- step 3: cost curves and the projection ----------------------------------------------------

def step_cost_curves(step: Step) -> None:
    from jaxspec.speculative.costs import measure

    sizes = SMOKE_COST_SIZES if step.smoke else COST_SIZES
    cache_len = SMOKE_COST_CACHE_LEN if step.smoke else COST_CACHE_LEN
    capacity = cache_len + max(sizes)   # one buffer for every T: 1088 = 17 KV blocks of 64
    repeats = 2 if step.smoke else 5
    impls = ["xla", "pallas_interpret" if step.smoke else "pallas"]
    if step.shared.get("pallas_compiles") is False:
        impls = impls[:1]
        step.note("Pallas curves skipped: the kernel compiled for no case in step 2")
    step.note(f"ms per target forward of T new tokens, batch 1, {cache_len}-token cache "
              f"({capacity} slots), bfloat16 random weights, median of {repeats} "
              "(jaxspec.speculative.costs.measure)")
    curves = step.shared.setdefault("curves", {})
    longest = 2.0
    for index, name in enumerate(SMOKE_SHAPES if step.smoke else SHAPES):
        config = model_config(name, step.smoke)
        if step.left() < 3 * longest:
            step.skip(f"the {name} curves")
            return
        start = time.perf_counter()
        model = random_model(config)
        step.add("models", dict(model=name, params_m=round(config.num_params() / 1e6, 1),
                                layers=config.num_layers, hidden=config.hidden_size,
                                heads=f"{config.num_heads}/{config.num_kv_heads}x{config.head_dim}",
                                init_s=round(time.perf_counter() - start, 2)))
        for impl in impls[:1] if step.smoke and index else impls:  # smoke: one Pallas curve
            target = model.replace(attn_impl=impl)
            curve = curves.setdefault(f"{name}/{impl}", {})
            for t in sizes:
                if step.left() < 1.5 * longest:
                    step.skip(f"{name}/{impl} from T = {t}")
                    return
                start = time.perf_counter()
                ok = step.attempt("_points", dict(model=name, impl=impl, T=t), lambda t=t: dict(
                    ms=measure(target, 1, (t,), repeats, cache_len, capacity).ms[0]))
                longest = max(longest, time.perf_counter() - start)
                if ok:
                    curve[t] = step.report.data["steps"][step.key]["tables"]["_points"][-1]["ms"]
                    step.set_table("curves", curve_rows(curves))
                elif impl != "xla":
                    step.note(f"{name}/{impl}: stopped at the first failure (T = {t})")
                    break
        model = target = None  # free the weights before the next shape
        gc.collect()


def curve_rows(curves: dict) -> list[dict]:
    rows = []
    for key, curve in curves.items():
        model, impl = key.split("/")
        row = dict(model=model, impl=impl)
        base = curve.get(1)
        for t, ms in sorted(curve.items()):
            row[f"T={t} ms"] = round(ms, 3)
        if base:
            row["T=max / T=1"] = round(curve[max(curve)] / base, 2)
        rows.append(row)
    return rows


def cpu_figures(root: Path = ROOT) -> list[dict]:
    """One entry per (CPU run, method): dict(run, method, mean_accepted, cpu_speedup,
    cpu_curve {T: ms}, source), from the committed SmolLM2 CPU benchmark files, or their bundled
    copy where a file is missing or unreadable. run: the file's name without
    "bench_smollm2_cpu_" (chat18, chat, methods)."""
    out = []
    for file in CPU_FIGURES_FILES:
        try:
            data = json.loads((root / "benchmarks" / file).read_text())
            curve = {int(k): float(v) for k, v in data["cost_curve_ms"].items()}
            methods = {m: (e["overall"]["mean_accepted"], e["overall"]["speedup"])
                       for m, e in data["methods"].items() if m != "autoregressive"}
            source = f"benchmarks/{file}"
        except (OSError, ValueError, KeyError):
            bundled = BUNDLED_CPU_FIGURES[file]
            curve, methods = bundled["cost_curve_ms"], bundled["methods"]
            source = f"{file} (bundled copy)"
        run = file.removeprefix("bench_smollm2_cpu_").removesuffix(".json")
        for method, (accepted, speedup) in methods.items():
            out.append(dict(run=run, method=method, mean_accepted=accepted, cpu_speedup=speedup,
                            cpu_curve=curve, source=source))
    return out


def projection_rows(curves: dict, figures: list[dict]) -> list[dict]:
    """Projected speedup over autoregressive per (curve, method).

    A method's round commits 1 + a tokens (a = mean accepted on CPU) for one verify of n nodes;
    autoregressive spends c(1) per token. Drafting free: (1 + a) c(1) / c(n). With the CPU's
    per-round overhead: r = (1 + a) / s_cpu - c_cpu(n) / c_cpu(1) target steps of drafting and
    bookkeeping per round (s_cpu the CPU speedup; 0 if negative), assumed to cost the same share
    of a step on the GPU: (1 + a) c(1) / (c(n) + r c(1)). Every round is charged n nodes (sized
    and prompt-lookup rounds that verify fewer make these lower bounds for those methods)."""
    from jaxspec.speculative.costs import CostModel

    rows = []
    for key, curve in curves.items():
        if 1 not in curve or len(curve) < 2:
            continue
        model, impl = key.split("/")
        gpu = CostModel.from_table(curve)
        for fig in figures:
            method = fig["method"]
            n = VERIFY_NODES.get(method)
            if n is None or n > 2 * max(curve):
                continue  # no cost measured near this many nodes
            a, s_cpu = fig["mean_accepted"], fig["cpu_speedup"]
            cpu = CostModel.from_table(fig["cpu_curve"])
            overhead = max(0.0, (1 + a) / s_cpu - cpu.at(n) / cpu.at(1))
            ratio = gpu.at(n) / gpu.at(1)
            rows.append(dict(
                target_shape=model, impl=impl, run=fig["run"], method=method, verify_nodes=n,
                extrapolated=n > max(curve),
                cpu_mean_accepted=round(a, 3), cpu_speedup=round(s_cpu, 3),
                gpu_cost_n_over_1=round(ratio, 3),
                projected_drafting_free=round((1 + a) / ratio, 3),
                cpu_overhead_steps=round(overhead, 3),
                projected_with_cpu_overhead=round((1 + a) / (ratio + overhead), 3),
                acceptance=("SmolLM2-135M-Instruct on CPU" if model == "smollm2-135m"
                            else "hypothetical: SmolLM2's acceptance on this shape")))
    return rows


def projection_pivot(rows: list[dict]) -> list[dict]:
    """One row per method, one column per measured curve: "drafting free / with CPU overhead"
    (x over autoregressive; * = cost extrapolated past the largest T measured)."""
    out = {}
    for r in rows:
        row = out.setdefault((r["run"], r["method"]), dict(
            cpu_run=r["run"], method=r["method"], nodes=r["verify_nodes"],
            cpu_accepted=r["cpu_mean_accepted"], cpu_speedup=r["cpu_speedup"],
            cpu_overhead_steps=r["cpu_overhead_steps"]))
        hypothetical = "" if r["target_shape"] == "smollm2-135m" else " (hypothetical)"
        row[f"{r['target_shape']}/{r['impl']}{hypothetical}"] = (
            f"{r['projected_drafting_free']:.2f}x / {r['projected_with_cpu_overhead']:.2f}x"
            + ("*" if r["extrapolated"] else ""))
    return list(out.values())


def finalize_cost_curves(step: Step) -> None:
    curves = step.shared.get("curves", {})
    figures = cpu_figures()
    rows = projection_rows(curves, figures)
    sources = list(dict.fromkeys(f["source"] for f in figures))
    step.note("PROJECTION, NOT A MEASUREMENT: the projected speedups below combine the GPU cost "
              "curves measured here with mean accepted tokens measured on CPU "
              f"({', '.join(sources)}); no speculative method ran on the GPU in this step. "
              "Each cell: projected speedup over autoregressive with drafting free / with the "
              "per-round overhead measured on CPU (cpu_overhead_steps, in target steps); * = "
              "verify cost extrapolated past the largest T measured; '(hypothetical)' columns "
              "apply SmolLM2's acceptance to another shape. Formulas: "
              "benchmarks/device_suite.py, projection_rows.")
    unsized = sorted({f["method"] for f in figures} - set(VERIFY_NODES))
    if unsized:
        step.note(f"not projected (verify size unknown here; add it to VERIFY_NODES): {unsized}")
    step.set_table("_projection", rows)
    step.set_table("projection", projection_pivot(rows))
    if rows:
        print("\n  PROJECTED GPU speedup over autoregressive (a projection from measured GPU "
              "cost curves and CPU acceptance, not a measurement):", flush=True)
        for r in rows:
            print(f"    {r['target_shape']:13s} {r['impl']:17s} {r['run']:8s} {r['method']:18s} "
                  f"n={r['verify_nodes']:2d}  a={r['cpu_mean_accepted']:.2f}  "
                  f"drafting free {r['projected_drafting_free']:.2f}x  with CPU overhead "
                  f"{r['projected_with_cpu_overhead']:.2f}x", flush=True)


# -- step 4: end to end ------------------------------------------------------------------------

def hf_from_jaxspec(model, device: str):
    """A transformers model holding exactly `model`'s weights (its dtype), on `device`."""
    import tempfile

    import numpy as np
    import torch
    import transformers

    from jaxspec.models.hf import to_hf_tensors

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
        hf_config = transformers.AutoConfig.from_pretrained(tmp)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[np.dtype(model.dtype).name]
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)

    def to_torch(array):  # a read-only view is fine: load_state_dict copies it
        if array.dtype.name == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        state = {k: to_torch(v) for k, v in to_hf_tensors(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed:
        raise RuntimeError(f"weights do not map onto transformers' model: missing "
                           f"{sorted(set(missing) - allowed)}, unexpected {sorted(unexpected)}")
    if model.config.tie_word_embeddings:  # the head must be the embedding, not a copy of it
        head, embed = hf.get_output_embeddings(), hf.get_input_embeddings()
        if head.weight.data_ptr() != embed.weight.data_ptr():
            head.weight = embed.weight
    return hf.eval()


def first_mismatches(ours, theirs) -> list[dict]:
    """Per row that differs: its index, the first differing position and both tokens there."""
    out = []
    for row, (a, b) in enumerate(zip(ours, theirs)):
        n = min(len(a), len(b))
        diff = [i for i in range(n) if a[i] != b[i]]
        if diff or len(a) != len(b):
            i = diff[0] if diff else n
            out.append(dict(row=row, index=i, jaxspec=int(a[i]) if i < len(a) else None,
                            transformers=int(b[i]) if i < len(b) else None))
    return out


def compare_with_transformers(step: Step) -> None:
    """Part A: jaxspec autoregressive vs transformers generate, same random weights, bfloat16."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import jaxspec as js
    from jaxspec.models.transformer import forward_train

    device = "cuda" if (not step.smoke and torch.cuda.is_available()) else "cpu"
    if step.smoke:
        torch.set_num_threads(1)
    new_tokens = 16 if step.smoke else 128
    repeats = 1 if step.smoke else 2
    config = model_config(E2E_SHAPE, step.smoke)
    start = time.perf_counter()
    model = random_model(config, seed=1)
    hf = hf_from_jaxspec(model, device)
    step.note(f"{E2E_SHAPE} shape ({config.num_params() / 1e6:.1f}M parameters), random bfloat16 "
              f"weights shared by both; transformers {_version('transformers')} on {device} "
              f"(default attention), greedy, {new_tokens} new tokens from random 32-token "
              f"prompts, every row forced to full length; best of {repeats} timed runs after a "
              f"warm-up; built in {time.perf_counter() - start:.1f} s")
    rng = np.random.default_rng(0)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def logits_parity():
        ids = rng.integers(0, config.vocab_size, (2, 32))
        ours = jax.jit(forward_train, static_argnums=1)(model.params, config,
                                                        jnp.asarray(ids, jnp.int32))[0]
        ours = np.asarray(ours.astype(jnp.float32))
        with torch.inference_mode():
            theirs = hf(torch.tensor(ids, device=device)).logits.float().cpu().numpy()
        return dict(max_abs_err=float(np.abs(ours - theirs).max()),
                    logit_scale=float(np.abs(theirs).max()),
                    argmax_agreement=float((ours.argmax(-1) == theirs.argmax(-1)).mean()))

    step.attempt("logits", dict(what="prefill logits, 2 x 32 tokens"), logits_parity)
    for batch in (1, 8):
        if step.left() < (20 if not step.smoke else 3):
            step.skip(f"transformers comparison at batch {batch}")
            return
        prompts = rng.integers(0, config.vocab_size, (batch, 32))

        def run(batch=batch, prompts=prompts):
            warm = js.generate(model, prompts.tolist(), new_tokens)
            ours, best = warm, float("inf")
            for _ in range(repeats):
                out = js.generate(model, prompts.tolist(), new_tokens)
                if out.stats["seconds"] < best:
                    ours, best = out, out.stats["seconds"]
            ids = torch.tensor(prompts, device=device)
            kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            with torch.inference_mode():
                hf.generate(ids, **dict(kwargs, max_new_tokens=8, min_new_tokens=8))  # warm-up
                hf_best = float("inf")
                for _ in range(repeats):
                    sync()
                    t0 = time.perf_counter()
                    theirs = hf.generate(ids, **kwargs)
                    sync()
                    hf_best = min(hf_best, time.perf_counter() - t0)
            theirs = theirs[:, ids.shape[1]:].cpu().numpy()
            ours_tokens = [ours.tokens[i, :ours.lengths[i]].tolist() for i in range(batch)]
            mismatches = first_mismatches(ours_tokens, theirs.tolist())
            tokens = int(ours.lengths.sum())
            return dict(jaxspec_tokens_per_s=round(tokens / best, 1),
                        transformers_tokens_per_s=round(batch * new_tokens / hf_best, 1),
                        speedup_vs_transformers=round(tokens / best / (batch * new_tokens / hf_best), 2),
                        jaxspec_compile_s=round(warm.stats["compile_seconds"], 2),
                        jaxspec_s=round(best, 4), transformers_s=round(hf_best, 4),
                        rows_identical=f"{batch - len(mismatches)}/{batch}",
                        first_mismatch=min(mismatches, key=lambda m: m["index"], default=None))

        step.attempt("jaxspec_vs_transformers", dict(batch=batch), run)
    rows = step.report.data["steps"][step.key]["tables"].get("jaxspec_vs_transformers", [])
    b1 = next((r for r in rows if r["batch"] == 1 and "speedup_vs_transformers" in r), None)
    if b1 is not None:
        step.note(f"goal (jaxspec AR >= {GOAL_HF_SPEEDUP}x transformers at the 1B shape, batch "
                  f"1): {b1['speedup_vs_transformers']:.2f}x: "
                  f"{'met' if b1['speedup_vs_transformers'] >= GOAL_HF_SPEEDUP else 'NOT met'}")
    hf = model = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def tiny_pair(smoke: bool):
    """(target, draft, prompts as token-id lists of one bucket, description)."""
    import jax.numpy as jnp
    import numpy as np

    import jaxspec as js

    if smoke:  # two random toy models of one vocabulary: compiles in seconds on a CPU
        base = dict(family="llama", vocab_size=256, max_position_embeddings=1024,
                    tie_word_embeddings=True, head_dim=16)
        target = js.models.create(js.ModelConfig(hidden_size=64, num_layers=2, num_heads=4,
                                                 num_kv_heads=2, intermediate_size=128, **base),
                                  0, dtype=jnp.float32)
        draft = js.models.create(js.ModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                num_kv_heads=1, intermediate_size=64, **base),
                                 1, dtype=jnp.float32)
        prompts = [np.random.default_rng(0).integers(1, 256, 20).tolist()]
        return target, draft, prompts, "toy random pair (smoke)"
    from jaxspec.bench.harness import heldout_prompts

    target, draft = js.load_default()   # float32, as `jaxspec bench` runs it on CPU
    length = 112                        # every prompt in the 128 bucket: one compile per method
    ids = [target.tokenizer(text)["input_ids"][-length:] for text in heldout_prompts(8)]
    prompts = [x for x in ids if len(x) > 64][:4]
    return target, draft, prompts, (f"shipped pair, {len(prompts)} held-out standard-library "
                                    f"prompts cut to their last {length} tokens")


def tiny_pair_drafters(step: Step) -> None:
    """Part B: the tiny pair's methods on the device, against autoregressive in the same run."""
    import numpy as np

    import jaxspec as js
    from jaxspec.bench.harness import method_table

    target, draft, prompts, what = tiny_pair(step.smoke)
    new_tokens = 16 if step.smoke else 128
    repeats = 1 if step.smoke else 2
    table = method_table(draft)
    names = SMOKE_TINY_PAIR_METHODS if step.smoke else TINY_PAIR_METHODS
    names = [n for n in names if n in table] + (
        [] if step.smoke else [n for n in table if n not in names])
    step.note(f"tiny pair: {what}; greedy, batch 1, {new_tokens} new tokens, best of {repeats} "
              "timed runs per prompt after a compiling warm-up; speedup over jaxspec "
              "autoregressive in the same run; identical = same tokens as autoregressive")
    reference, base_tps, longest = {}, None, 5.0
    for name in names:
        if step.left() < 1.5 * longest:
            step.skip(f"tiny-pair methods {names[names.index(name):]}")
            return
        drafter = table[name]
        start = time.perf_counter()

        def run(name=name, drafter=drafter):
            tokens = seconds = accepted = rounds = 0
            compile_s, identical = 0.0, True
            for i, prompt in enumerate(prompts):
                first = js.generate(target, [prompt], new_tokens, drafter=drafter)
                compile_s += first.stats["compile_seconds"]
                best = None
                for _ in range(repeats):
                    out = js.generate(target, [prompt], new_tokens, drafter=drafter)
                    if best is None or out.stats["seconds"] < best.stats["seconds"]:
                        best = out
                row_tokens = best.tokens[0, :best.lengths[0]].tolist()
                if name == "autoregressive":
                    reference[i] = row_tokens
                identical &= row_tokens == reference.get(i)
                tokens += int(best.lengths[0])
                seconds += best.stats["seconds"]
                accepted += int(np.sum(best.stats["accepted"]))
                rounds += max(int(np.sum(best.stats["target_steps"])) - 1, 1)
            return dict(tree_nodes=0 if drafter is None else drafter.tree.num_nodes - 1,
                        tokens_per_s=round(tokens / seconds, 1),
                        mean_accepted=round(accepted / rounds, 3) if drafter is not None else 0.0,
                        identical=identical, compile_s=round(compile_s, 2), tokens=tokens)

        ok = step.attempt("tiny_pair", dict(method=name), run)
        longest = max(longest, time.perf_counter() - start)
        rows = step.report.data["steps"][step.key]["tables"]["tiny_pair"]
        if ok and name == "autoregressive":
            base_tps = rows[-1]["tokens_per_s"]
        if ok and base_tps:
            rows[-1]["speedup"] = round(rows[-1]["tokens_per_s"] / base_tps, 3)
            step.report.flush()
        if not ok and name == "autoregressive":
            raise RuntimeError("autoregressive decoding of the tiny pair failed; see its row")


def step_end_to_end(step: Step) -> None:
    for part in (compare_with_transformers, tiny_pair_drafters):
        if step.left() < 5:
            step.skip(part.__name__)
            continue
        try:
            part(step)
        except Exception:  # one part's failure must not cost the other
            step.errors += 1
            step.report.data["steps"][step.key]["row_errors"].append(
                f"{part.__name__}:\n" + traceback.format_exc()[-6000:])
            step.note(f"{part.__name__} failed (traceback below)")


STEP_FUNCTIONS = {"environment": (step_environment, None),
                  "tree_attention": (step_tree_attention, None),
                  "cost_curves": (step_cost_curves, finalize_cost_curves),
                  "end_to_end": (step_end_to_end, None)}


# -- main --------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="every step on CPU at toy sizes (JAX_PLATFORMS=cpu), < 1 minute")
    parser.add_argument("--out", default=None,
                        help="output directory (default: $OUT, else ./device_suite_out)")
    parser.add_argument("--steps", default="all",
                        help="comma-separated step numbers or names to run (default: all)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every step's time budget by this")
    parser.add_argument("--no-jit-cache", action="store_true",
                        help="do not use a persistent compilation cache under /tmp (GPU runs)")
    args = parser.parse_args(argv)
    wanted = []
    for item in args.steps.split(","):
        item = item.strip()
        if item == "all":
            wanted = list(STEPS)
        elif item.isdigit() and 1 <= int(item) <= len(STEPS):
            wanted.append(STEPS[int(item) - 1])
        elif item in STEPS:
            wanted.append(item)
        else:
            parser.error(f"unknown step {item!r}; steps: 1-{len(STEPS)} or {', '.join(STEPS)}")
    args.steps = [s for s in STEPS if s in wanted]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        # jax takes memory as it needs it, leaving the rest to PyTorch (step 4 runs both).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out_dir = Path(args.out or os.environ.get("OUT") or "device_suite_out")
    import jax

    jit_cache = not args.smoke and not args.no_jit_cache
    if jit_cache:  # a rerun on the same (warm) machine then skips most compiles
        try:
            jax.config.update("jax_compilation_cache_dir", "/tmp/jaxspec_device_suite_jit_cache")
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        except Exception as err:  # an option this jax does not know: run without the cache
            print(f"no persistent compilation cache: {type(err).__name__}: {err}", flush=True)
            jit_cache = False
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    meta = dict(device=None, smoke=args.smoke, started=_now(), steps=args.steps,
                argv=" ".join(sys.argv[1:]), commit=commit,
                jit_cache=jit_cache)
    report = Report(out_dir, meta)
    report.data["meta"]["device"] = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    budgets = SMOKE_BUDGETS_S if args.smoke else BUDGETS_S
    shared: dict = {}
    statuses, carry = {}, 0.0
    signal.signal(signal.SIGTERM, _on_term)
    print(f"jaxspec device suite: steps {args.steps}, writing {out_dir}/device_suite.json and "
          ".md", flush=True)
    try:
        for key in args.steps:
            fn, finalize = STEP_FUNCTIONS[key]
            budget = budgets[key] * args.budget_scale + carry
            start = time.monotonic()
            statuses[key] = run_step(report, key, fn, budget, args, shared, finalize)
            carry = max(0.0, budget - (time.monotonic() - start))
    except Terminated:
        print("terminated: results so far are in the report", flush=True)
        return 143
    report.data["meta"]["finished"] = _now()
    report.data["meta"]["statuses"] = statuses
    report.flush()
    print(f"statuses: {statuses}; total {report.data['meta']['elapsed_s']} s; "
          f"report: {report.md_path}", flush=True)
    return 0 if all(s in ("ok", "partial") for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
