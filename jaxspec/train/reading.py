"""Reading data: conversations whose answers are texts found on this machine, not the target's.

A feature drafter learns "target feature at t, token t+1 -> what the target says next". That
mapping can be taught on text the target only reads: one forward over given text yields the
target's features and, as labels, its greedy token at every position
(`jaxspec.train.eagle.compute_features(..., labels=True)`). A forward over given text costs far
less per token than generating it (about 10x on a 2-core CPU), so reading data is how a drafter
sees millions of tokens of varied text within a CPU budget.

Each conversation is one user turn and one assistant turn whose content is a local text:
  * docstring  a long docstring of a standard-library or installed package's function, class
               or module ("What does `json.dumps` do?");
  * readme     a section of an installed package's README (its wheel's METADATA);
  * reference  a topic of the Python language reference (`pydoc_data.topics`);
  * code       the source of a standard-library function, in a fenced block, answering
               "Write a Python function ...".
Everything is read from the local Python installation; the mix is a pure function of
(count, seed, the installed files).
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from jaxspec.train.data import stdlib_files, stdlib_root

SOURCES = ("docstring", "readme", "reference", "code")
# share of each source in the mix (renormalised over the sources asked for)
MIX = {"docstring": 0.35, "readme": 0.25, "reference": 0.1, "code": 0.3}
MIN_CHARS, MAX_CHARS = 300, 2500

_DOC_QUESTIONS = ["What does `{n}` do?", "Explain `{n}`.", "Describe the purpose of `{n}`.",
                  "How do I use `{n}`?", "Give me an overview of `{n}`."]
_README_QUESTIONS = ["Tell me about the {n} package.", "What is {n} and how do I use it?",
                     "Explain the \"{h}\" part of {n}.", "Can you describe {h} in {n}?"]
_REFERENCE_QUESTIONS = ["Explain {n} in Python.", "How does {n} work in Python?",
                        "What does the Python reference say about {n}?"]
_CODE_QUESTIONS = ["Write a Python function `{n}` that {d}", "How would you implement `{n}` in "
                   "Python? It {d}", "Show me Python code for `{n}`, which {d}"]


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _python_files(rng: random.Random) -> list[tuple[Path, Path]]:
    """(root, file) for the standard library and installed packages, shuffled; never jaxspec's
    own files (its benchmark prompts must stay held out)."""
    std = [(stdlib_root(), p) for p in stdlib_files()]
    site = _site_packages()
    third = [(site, p) for p in sorted(site.rglob("*.py"))
             if not any(part.startswith("jaxspec") or part == "tests"
                        for part in p.relative_to(site).parts)]
    files = std + third
    rng.shuffle(files)
    return files


def _docstrings(limit: int, rng: random.Random) -> list[tuple[str, str]]:
    """(qualified name, docstring) of MIN_CHARS..MAX_CHARS characters."""
    out = []
    for root, path in _python_files(rng):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        for node in [tree] + [n for n in ast.walk(tree)
                              if isinstance(n, (ast.FunctionDef, ast.ClassDef))]:
            doc = ast.get_docstring(node)
            if doc and MIN_CHARS <= len(doc) <= MAX_CHARS:
                out.append((module if node is tree else f"{module}.{node.name}", doc.strip()))
        if len(out) >= limit:
            break
    return out[:limit]


def _code(limit: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(name, first docstring sentence, source) of standard-library functions of 200..MAX_CHARS
    characters with a docstring."""
    files = stdlib_files()
    rng.shuffle(files)
    out = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
                continue
            doc = ast.get_docstring(node)
            segment = ast.get_source_segment(source, node)
            if not doc or not segment or not 200 <= len(segment) <= MAX_CHARS:
                continue
            first = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
            first = first[0].lower() + first[1:] if first else first
            if 20 <= len(first) <= 200:
                lines = segment.splitlines()
                indent = min(len(x) - len(x.lstrip()) for x in lines[1:] if x.strip()) if len(lines) > 1 else 0
                body = "\n".join([lines[0]] + [x[max(0, indent - 4):] for x in lines[1:]])
                out.append((node.name, first, body))
        if len(out) >= limit:
            break
    return out[:limit]


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of a Markdown or reStructuredText document, split at its headings."""
    lines = text.splitlines()
    out, heading, body = [], "overview", []
    for i, line in enumerate(lines):
        md = re.match(r"^#{1,4}\s+(.+)", line)
        rst = (i + 1 < len(lines) and line.strip() and re.fullmatch(r"[=\-~^*]{3,}", lines[i + 1].strip())
               and len(lines[i + 1].strip()) >= len(line.strip()) - 2)
        if md or rst:
            out.append((heading, "\n".join(body).strip()))
            heading, body = (md.group(1) if md else line).strip(" #*`"), []
        elif not re.fullmatch(r"[=\-~^*]{3,}", line.strip()):
            body.append(line)
    out.append((heading, "\n".join(body).strip()))
    return out


def _prose(text: str) -> bool:
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters >= 0.75 * len(text) and "](http" not in text[:200]


def _readmes(limit: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(package, heading, section) from the READMEs of installed distributions."""
    dists = sorted({d.metadata["Name"]: d for d in metadata.distributions()
                    if d.metadata["Name"]}.items())
    rng.shuffle(dists)
    out = []
    for name, dist in dists:
        if "jaxspec" in name.lower():
            continue
        raw = dist.read_text("METADATA") or ""
        body = Parser().parsestr(raw).get_payload() or ""
        for heading, section in _sections(body):
            if MIN_CHARS <= len(section) <= MAX_CHARS and _prose(section):
                out.append((name, heading, section))
        if len(out) >= limit:
            break
    return out[:limit]


def _reference(limit: int) -> list[tuple[str, str]]:
    """(topic, text chunk) of the Python language reference shipped with the interpreter."""
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        chunk = ""
        for para in topics[topic].split("\n\n"):
            if len(chunk) + len(para) > MAX_CHARS and len(chunk) >= MIN_CHARS:
                out.append((topic, chunk.strip()))
                chunk = ""
            chunk += para + "\n\n"
        if len(chunk.strip()) >= MIN_CHARS:
            out.append((topic, chunk.strip()[:MAX_CHARS]))
    return out[:limit]


def source_counts(count: int, sources=SOURCES) -> dict[str, int]:
    """How many of `count` conversations each source gives: `MIX` renormalised over `sources`,
    rounded by largest remainder so the counts add up to `count`."""
    total = sum(MIX[s] for s in sources)
    exact = {s: count * MIX[s] / total for s in sources}
    want = {s: int(exact[s]) for s in sources}
    by_remainder = sorted(sources, key=lambda s: (want[s] - exact[s], SOURCES.index(s)))
    for s in by_remainder[:count - sum(want.values())]:
        want[s] += 1
    return want


def reading_conversations(count: int, seed: int = 1, sources=SOURCES) -> list[list[dict]]:
    """`count` two-turn conversations whose answers are local texts, mixed by `MIX` over
    `sources` and shuffled; fewer when the machine holds fewer texts of a source."""
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown reading source(s) {unknown}; choose from {list(SOURCES)}")
    rng = random.Random(seed)
    want = source_counts(count, sources)
    convs = []

    def turn(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    if want.get("docstring"):
        convs += [turn(rng.choice(_DOC_QUESTIONS).format(n=n), d)
                  for n, d in _docstrings(want["docstring"], rng)]
    if want.get("readme"):
        convs += [turn(rng.choice(_README_QUESTIONS).format(n=n, h=h), s)
                  for n, h, s in _readmes(want["readme"], rng)]
    if want.get("reference"):
        convs += [turn(rng.choice(_REFERENCE_QUESTIONS).format(n=t.replace("-", " ")), s)
                  for t, s in _reference(want["reference"])]
    if want.get("code"):
        convs += [turn(rng.choice(_CODE_QUESTIONS).format(n=n, d=d),
                       f"Here is an implementation:\n\n```python\n{src}\n```")
                  for n, d, src in _code(want["code"], rng)]
    rng.shuffle(convs)
    return convs[:count]
