"""Code blocks of the README and the docs pages, with the markers that say how each is checked.

A fenced block is checked according to the HTML comment on the line(s) right above its fence:

* ``<!-- not-run: REASON -->``: not run; the reason (e.g. "needs a GPU", "45 min; tests/test_x.py runs the same
  path") is required and must not be empty.
* ``<!-- file: NAME -->``: not run itself; written to ``NAME`` in the page's working folder before the blocks
  after it run (a script, a YAML config).
* ``<!-- continues -->``: a ``python`` block that runs in the namespace of the page's previous ``python`` block
  (the page's text must say that it continues the example above). Without it every ``python`` block runs in a
  fresh namespace, so it must define every name it uses.
* no marker: ``python`` blocks are executed; ``bash`` blocks run line by line in a shell, in the page's working
  folder, with ``python`` meaning this interpreter.

``text`` blocks are output, not code. A block of any other language, or with no language, must carry
``not-run`` or ``file``: :func:`check_markers` reports it.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNNABLE = {"python", "bash"}
OUTPUT = {"text"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)[^\n]*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not-run|file|continues)\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its code and its marker."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # "not-run", "file", "continues" or None
    arg: str  # the reason, the file name, or ""

    @property
    def where(self) -> str:
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{path}:{self.line}"


def _closes(line: str, fence: str) -> bool:
    close = line.strip()
    return len(close) >= len(fence) and set(close) == {fence[0]}


def blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, in order, with the marker above it (if any)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], m["lang"]
        body, j = [], i + 1
        while j < len(lines) and not _closes(lines[j], fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: code fence never closed")
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = _MARKER.match(lines[k]) if k >= 0 else None
        out.append(
            Block(
                path,
                i + 1,
                lang,
                "\n".join(body) + "\n",
                mark["kind"] if mark else None,
                (mark["arg"] or "").strip() if mark else "",
            )
        )
        i = j + 1
    return out


def check_markers(bs: list[Block]) -> list[str]:
    """What is wrong with the blocks' markers: one message per problem (empty when all are checkable)."""
    problems = []
    previous_python = False
    for b in bs:
        if b.marker == "not-run" and not b.arg:
            problems.append(f"{b.where}: not-run without a reason")
        elif b.marker == "file" and not re.fullmatch(r"[\w.-]+", b.arg):
            problems.append(f"{b.where}: file marker needs a plain file name, got {b.arg!r}")
        elif b.marker == "continues" and (b.lang != "python" or not previous_python):
            problems.append(f"{b.where}: continues needs a python block after another python block")
        elif b.marker is None and b.lang not in RUNNABLE | OUTPUT:
            problems.append(
                f"{b.where}: a {b.lang or 'plain'!s} block must be marked not-run or file (use ```text for output)"
            )
        if b.lang == "python" and b.marker not in ("not-run", "file"):
            previous_python = True
    return problems


def doc_pages() -> list[Path]:
    """The READMEs (the project's and the task packages') and every Markdown page of the docs site."""
    return [
        REPO / "README.md",
        REPO / "nlp" / "README.md",
        REPO / "bio" / "README.md",
        *sorted((REPO / "docs").rglob("*.md")),
    ]


def run_page(page: Path, workdir: Path, monkeypatch) -> dict:
    """Run a page's code as a reader would, in ``workdir``: ``file`` blocks are written there, ``python`` blocks are
    executed in this process (a fresh ``__main__`` namespace each, or the previous one for ``continues``), ``bash``
    blocks run in a shell with this interpreter first on ``PATH`` and the checkout importable. Returns the last
    ``python`` block's namespace. Any failure raises, naming the block."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("LOCAL_RANK", None)
    namespace: dict = {}
    for b in blocks(page):
        if b.marker == "not-run":
            continue
        if b.marker == "file":
            (workdir / b.arg).write_text(b.code, encoding="utf-8")
        elif b.lang == "python":
            if b.marker != "continues":
                namespace = {"__name__": "__main__"}
            exec(compile(b.code, b.where, "exec"), namespace)  # noqa: S102 (the page's own example)
        elif b.lang == "bash":
            for command in commands(b.code):
                argv = shlex.split(command, comments=True)
                if argv[0] == "python" and not _SHELL.search(command.split("#")[0]):
                    _run_python(argv[1:], b.where, monkeypatch)  # in this process: no second interpreter start
                    continue
                proc = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", command],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert proc.returncode == 0, f"{b.where}: {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return namespace


_SHELL = re.compile(r"[|&;<>$`(){}*?]")


def commands(code: str) -> list[str]:
    """The commands of a ``bash`` block: one per line, backslash continuations joined, blank and comment lines
    dropped."""
    out, pending = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def _run_python(args: list[str], where: str, monkeypatch) -> None:
    """``python script.py ...`` or ``python -m module ...`` as ``__main__`` in this process (a ``SystemExit`` of 0,
    as from ``--help``, counts as success)."""
    with monkeypatch.context() as m:
        if args[0] == "-m":
            m.setattr(sys, "argv", [args[1], *args[2:]])
            run = lambda: runpy.run_module(args[1], run_name="__main__", alter_sys=True)  # noqa: E731
        else:
            m.setattr(sys, "argv", list(args))
            run = lambda: runpy.run_path(args[0], run_name="__main__")  # noqa: E731
        try:
            run()
        except SystemExit as e:
            assert e.code in (0, None), f"{where}: python {' '.join(args)} exited with {e.code}"
