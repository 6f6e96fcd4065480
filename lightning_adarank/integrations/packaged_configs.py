"""Packaged YAML configs for a LightningCLI: ``--config nlp/configs/glue/sst2_r8.yaml`` works after ``pip install``.

The task packages (``nlp``, ``bio``) ship their ``configs/`` folder as package data. A checkout has the same
files at ``<package>/configs/...``, so the READMEs write ``--config nlp/configs/glue/sst2_r8.yaml``.
:func:`resolve_packaged_configs` lets that command run anywhere: a ``--config`` value that is not an existing
file, and names a file under the package's ``configs/`` (written as ``<package>/configs/<name>``,
``configs/<name>`` or just ``<name>``, ``.yaml`` optional), is replaced by the installed file's path.
An existing file always wins, so a local config of the same name is never shadowed.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

__all__ = ["packaged_config", "packaged_configs", "resolve_packaged_configs"]


def _root(package: str) -> Path:
    return Path(str(importlib.resources.files(package) / "configs"))


def packaged_configs(package: str) -> list[str]:
    """The names (``glue/sst2_r8.yaml``, ...) of the configs ``package`` ships."""
    root = _root(package)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml")) if root.is_dir() else []


def packaged_config(package: str, name: str) -> Path | None:
    """The installed path of config ``name`` of ``package`` (see the module docstring), or ``None``."""
    rel = name.replace("\\", "/")
    for prefix in (f"{package}/configs/", "configs/"):
        if rel.startswith(prefix):
            rel = rel[len(prefix) :]
            break
    root = _root(package)
    for cand in (rel, rel + ".yaml"):
        path = root / cand
        if path.is_file():
            return path
    return None


def resolve_packaged_configs(args: list[str], package: str) -> list[str]:
    """``args`` with each ``--config``/``-c`` value that is not an existing file but a packaged config of
    ``package`` replaced by the installed file's path (other arguments unchanged)."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            j, value, fmt = i + 1, out[i + 1], "{}"
        elif arg.startswith("--config="):
            j, value, fmt = i, arg[len("--config=") :], "--config={}"
        else:
            continue
        if not os.path.exists(value):
            found = packaged_config(package, value)
            if found is not None:
                out[j] = fmt.format(found)
    return out
