"""``VerifiedCheckpointIO``: Lightning/Fabric checkpoint I/O that writes atomically and verifies on load.

Lightning's ``TorchCheckpointIO`` writes the file in place, so a process killed while saving leaves a
truncated ``last.ckpt``; and ``torch.load`` does not check the CRC-32 the zip archive stores, so a corrupted
byte inside a tensor loads as a wrong value. This plugin

* saves to a temporary file in the same folder, flushes it to disk and renames it over the target
  (``os.replace``, atomic on POSIX): a kill leaves either the old checkpoint or the new one, never half;
* before loading, checks the file with :func:`~lightning_adarank.optim.checkpoint.verify_checkpoint_file`
  and raises :class:`~lightning_adarank.optim.checkpoint.CheckpointFileError` naming the file.

:class:`~lightning_adarank.AdaRankGradStrategy` uses it unless given another ``CheckpointIO``; elsewhere pass
it as a plugin: ``Trainer(plugins=[VerifiedCheckpointIO()])`` or ``Fabric(plugins=[VerifiedCheckpointIO()])``.
Remote paths (``s3://`` ...) go to ``TorchCheckpointIO`` unchanged.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from ..optim.checkpoint import CheckpointFileError, verify_checkpoint_file

__all__ = ["VerifiedCheckpointIO", "CheckpointFileError"]


class VerifiedCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic saves and a CRC check before every load (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if _is_local_file_protocol(path) and os.path.isfile(path):
            verify_checkpoint_file(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
