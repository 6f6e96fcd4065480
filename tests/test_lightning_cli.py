"""LightningCLI configures both doors: ``--trainer.strategy lightning_adarank.AdaRankGradStrategy`` and
``--trainer.callbacks+=lightning_adarank.AdaRankGradCallback``, from flags and from a YAML config (real
LightningCLI runs in a subprocess: tests/scripts/cli_app.py), and ``--...help`` lists every setting with its
documentation."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_adarank.integrations.typed import setting_docs
from lightning_adarank.optim.config import SETTING_NAMES

SCRIPT = Path(__file__).parent / "scripts" / "cli_app.py"
QUIET = [
    "--trainer.max_steps",
    "3",
    "--trainer.logger",
    "false",
    "--trainer.enable_checkpointing",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.accelerator",
    "cpu",
]


def _run(args: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "fit", *args, *QUIET],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _check(result: dict, strategy: str, max_rank: int, energy: float) -> None:
    assert result["strategy"] == strategy and result["optimizer"] == "AdaRankGrad"
    groups = result["groups"]
    assert {g["max_rank"] for g in groups} == {max_rank} and {g["energy"] for g in groups} == {energy}
    # the module's decay / no-decay split and betas survive
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and all(g["betas"] == [0.85, 0.98] for g in groups)
    assert all(1 <= r <= max_rank for r in result["ranks"].values()) and result["ranks"]


CASES = {
    "strategy-flags": (
        [
            "--trainer.strategy",
            "lightning_adarank.AdaRankGradStrategy",
            "--trainer.strategy.init_args.max_rank",
            "4",
            "--trainer.strategy.init_args.energy",
            "0.8",
        ],
        None,
    ),
    "strategy-yaml": (
        [],
        "trainer:\n  strategy:\n    class_path: lightning_adarank.AdaRankGradStrategy\n"
        "    init_args:\n      max_rank: 4\n      energy: 0.8\n",
    ),
    "callback-flags": (
        [
            "--trainer.callbacks+=lightning_adarank.AdaRankGradCallback",
            "--trainer.callbacks.max_rank",
            "4",
            "--trainer.callbacks.energy",
            "0.8",
        ],
        None,
    ),
    "callback-yaml": (
        [],
        "trainer:\n  callbacks:\n    - class_path: lightning_adarank.AdaRankGradCallback\n"
        "      init_args:\n        max_rank: 4\n        energy: 0.8\n",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_lightning_cli_configures_the_doors(case, tmp_path):
    args, yaml = CASES[case]
    if yaml:
        (tmp_path / "config.yaml").write_text(yaml)
        args = ["--config", str(tmp_path / "config.yaml"), *args]
    result = _run(args, tmp_path)
    via_callback = case.startswith("callback")
    _check(result, "SingleDeviceStrategy" if via_callback else "AdaRankGradStrategy", 4, 0.8)
    assert ("AdaRankGradCallback" in result["callbacks"]) == via_callback


def _help(option: str, class_path: str) -> str:
    sys.path.insert(0, str(SCRIPT.parent.parent))
    from scripts.cli_app import main  # noqa: PLC0415

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", f"--{option}.help", class_path])
    return out.getvalue()


@pytest.mark.parametrize(
    "option,class_path",
    [
        ("trainer.strategy", "lightning_adarank.AdaRankGradStrategy"),
        ("trainer.strategy", "lightning_adarank.AdaRankGradDDPStrategy"),
        ("trainer.callbacks", "lightning_adarank.AdaRankGradCallback"),
    ],
)
def test_help_lists_every_setting_with_its_doc(option, class_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli_app.py"])
    text = " ".join(_help(option, class_path).split())  # argparse wraps lines
    docs = setting_docs()
    assert set(docs) == SETTING_NAMES  # every field of AdaRankGradConfig is documented in its docstring
    for name in sorted(SETTING_NAMES) + ["target_modules", "include_embeddings", "layerwise"]:
        assert f"--{option}.{name} " in text, name
    for name in SETTING_NAMES:  # the config's own words (first few) appear in the help
        assert " ".join(docs[name].split()[:4]) in text, name
    assert "each param group keeps the module optimizer's value" in text  # lr & co. default to the module's
    if "DDP" in class_path:
        assert f"--{option}.process_group_backend" in text


def test_cli_checks_settings_when_the_strategy_is_built(tmp_path, monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent.parent))
    from scripts.cli_app import main  # noqa: PLC0415

    monkeypatch.setattr(sys, "argv", ["cli_app.py"])
    with pytest.raises(ValueError, match=r"energy=1.5 must be in \(0.0, 1.0\]"):
        main(
            [
                "fit",
                "--trainer.strategy",
                "lightning_adarank.AdaRankGradStrategy",
                "--trainer.strategy.init_args.energy",
                "1.5",
                *QUIET,
            ]
        )
