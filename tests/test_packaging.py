"""The wheel built from a clean checkout carries the task configs, and the READMEs' ``--config nlp/configs/...``
commands work from an installed copy, away from any checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_from_clean_checkout_ships_configs_and_cli_finds_them(tmp_path):
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout and git (the wheel is built from a clean clone of HEAD)")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    # --no-build-isolation: build with the installed setuptools (no download)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(clone),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("lightning_adarank-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        p.relative_to(clone).as_posix() for d in ("nlp/configs", "bio/configs") for p in (clone / d).rglob("*.yaml")
    }
    assert len(expected) >= 18 and expected <= names, sorted(expected - names)

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    # the nlp README's command, as written, from a folder with no checkout: the packaged configs are used
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nlp",
            "fit",
            "--config",
            "nlp/configs/glue_roberta_base.yaml",
            "--config",
            "nlp/configs/glue/mrpc_r4.yaml",
            "--print_config",
        ],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task: mrpc" in proc.stdout and "rank: 4" in proc.stdout
    code = (
        "import nlp, bio, sys; from lightning_adarank.integrations.packaged_configs import packaged_config as p;"
        f"assert nlp.__file__.startswith({str(site)!r}), nlp.__file__;"
        "assert p('bio', 'bio/configs/cardiomyopathy.yaml').is_file(); print(p('nlp', 'glue/sst2_r8'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=run_dir, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith(str(site)) and out.stdout.strip().endswith("glue/sst2_r8.yaml")
