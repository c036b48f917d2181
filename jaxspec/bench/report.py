"""What the benchmark entries and scripts share: picking methods by name, writing a report."""

from __future__ import annotations

import json
from pathlib import Path


def markdown_table(columns: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines: a header of `columns`, then one line per row of cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_report(out_dir: Path, stem: str, data: dict, lines: list[str]) -> Path:
    """Write a benchmark script's `stem`.json (data) and `stem`.md (lines), print the Markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return md


def selected_methods(methods: dict, spec: str, also: tuple[str, ...] = ()) -> dict:
    """The methods named in `spec` ("all" or comma-separated names; autoregressive always kept).
    Names in `also` are accepted without being in `methods` (run elsewhere, e.g. Hugging Face)."""
    if spec == "all":
        return methods
    wanted = set(spec.split(",")) | {"autoregressive"}
    unknown = wanted - set(methods) - set(also)
    if unknown:
        known = sorted(methods) + list(also)
        raise ValueError(f"unknown methods {sorted(unknown)}; known for this model: {', '.join(known)}")
    return {k: v for k, v in methods.items() if k in wanted}
