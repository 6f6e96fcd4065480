"""The docs site builds with ``mkdocs build --strict`` (a broken link or API reference fails), and every code block
of its pages is either run here or marked not runnable with a reason (see ``doc_blocks`` for the markers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from doc_blocks import REPO, blocks, check_markers, doc_pages, run_page

DOCS = sorted((REPO / "docs").rglob("*.md"))
# pages whose runnable blocks train models (seconds each) are "slow", like the rest of the suite's training tests
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\d+|#\d+\b|\bPR\s*#?\d+", re.I)


def test_every_code_block_runs_or_says_why_not():
    problems = [p for page in doc_pages() for p in check_markers(blocks(page))]
    assert not problems, "\n".join(problems)


def test_marker_check_catches_unmarked_and_reasonless_blocks(tmp_path):
    page = tmp_path / "probe.md"
    page.write_text(
        "```yaml\na: 1\n```\n\n<!-- not-run: -->\n```python\nx\n```\n\n<!-- continues -->\n"
        "```bash\nls\n```\n\n```\nplain\n```\n\n<!-- file: cfg.yaml -->\n```yaml\nb: 2\n```\n"
    )
    found = check_markers(blocks(page))
    assert len(found) == 4, found
    assert "yaml block must be marked" in found[0] and "without a reason" in found[1]
    assert "continues needs a python block" in found[2] and "plain block" in found[3]


def test_no_issue_numbers_in_user_facing_pages():
    hits = [
        f"{page.relative_to(REPO)}:{i}: {line.strip()}"
        for page in doc_pages()
        for i, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if ISSUE_NUMBER.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    # the first screen tells how to switch a Trainer over
    assert "AdaRankGradCallback" in "\n".join(text.splitlines()[:80])
    missing = [
        link
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
        if "://" not in link and not (REPO / link).exists()
    ]
    assert not missing, missing


@pytest.mark.slow  # mkdocstrings reads the package: ~20 s
def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="needs the docs extra (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="needs the docs extra (pip install -e '.[docs]')")
    out = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # the API reference was rendered from the docstrings, and the benchmark plots were carried into the site
    api = (out / "reference" / "optimizer" / "index.html").read_text(encoding="utf-8")
    assert "AdaRankGrad" in api and "state_bytes" in api
    assert (out / "results" / "scaling_cpu.png").stat().st_size > 0
    # the guides include the README's examples by snippet section: the included code arrived, no marker leaked
    guide = (out / "guide" / "lightning" / "index.html").read_text(encoding="utf-8")
    assert "CosineAnnealingLR" in guide and "LightningCLI" in guide and "--8&lt;--" not in guide


RUNNABLE_PAGES = [
    p for p in DOCS if any(b.marker in (None, "continues") and b.lang in ("python", "bash") for b in blocks(p))
]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_page_code_runs_as_written(page, tmp_path, monkeypatch):
    run_page(page, tmp_path, monkeypatch)
