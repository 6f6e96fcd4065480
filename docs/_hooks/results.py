"""mkdocs hook: publish ``benchmarks/results/`` (the measured tables and plots, each headed by its command, machine
and date) under ``results/`` in the site, from where they are, so that the docs link to the files the benchmark
scripts wrote instead of to copies."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in (".md", ".png", ".csv"):
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files
