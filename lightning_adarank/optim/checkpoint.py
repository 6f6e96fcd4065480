"""Checkpoint hygiene for :class:`~lightning_adarank.AdaRankGrad` states: a format tag, and checks on load.

``AdaRankGrad.state_dict()`` is torch's optimizer state dict plus one entry, ``"adarank"``
(:func:`format_tag`): ``{"format": FORMAT, "version": "<package version>"}``, plain Python values, so the
state still loads with ``torch.load(..., weights_only=True)``. ``load_state_dict`` first calls
:func:`check_state_dict`, which raises ``ValueError`` naming the **first** mismatch between the saved state
and the optimizer it is loaded into:

* the format tag: a ``format`` newer than this package reads (written by a newer lightning-adarank) or a
  malformed tag; a state without a tag is format 0 (lightning-adarank 0.1.0 before the tag was added), whose
  layout is the same as format 1: it is checked and loaded as format 1 (the documented migration). Format 2
  changed only the 8-bit storage (:mod:`.quant`: a plain ``uint8`` buffer with row-wise blocks and √v, where
  formats 0–1 held torchao's ``OptimState8bit`` with ``v``); :func:`migrate_state_dict` decodes such old
  tensors and re-stores them in the current format, so an old 8-bit checkpoint resumes (its values within one
  8-bit rounding of the saved ones); fp32 and bf16 states are unchanged;
* the group structure: number of parameter groups, parameters per group, parameter names when both sides
  have them, and the settings that decide the layout (``low_rank``, ``max_rank``, ``min_rank``): a different
  ``max_rank`` changes which matrices are projected and how large their bases may be, and torch would
  silently put the checkpoint's value back into the group, so it is refused rather than ignored;
* every parameter's state: an unprojected parameter needs AdamW moments of the parameter's shape; a
  projected ``(m, n)`` matrix needs a basis ``(min(m, n), r)`` (or, 8-bit, its flattened whole blocks) with ``min_rank <= r <= max_rank``
  (``r <= min(m, n)``), moments ``(r, n)`` (``m <= n``) or ``(m, r)`` (``m > n``) and ``rank == r``, or the same
  tensors zero-padded to ``max_rank`` columns/rows with ``rank`` the true rank (the fixed-shape layout of FSDP2
  states, :mod:`lightning_adarank.distributed.checkpoint`; shapes are the global ones of DTensors). A state
  from another model (other shapes) or from another optimizer (e.g. ``torch.optim.AdamW``, whose full-size
  moments are not a projected layout) fails here, with the parameter's name, instead of at the first step.

Changing ``max_rank`` on resume is not a migration this module performs: build the optimizer with the
checkpoint's ``max_rank`` (the error says which), or start the optimizer state afresh.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from . import quant
from .linalg import projected_shape, projection_side

__all__ = [
    "FORMAT",
    "STATE_KEY",
    "format_tag",
    "check_state_dict",
    "migrate_state_dict",
    "CheckpointFileError",
    "verify_checkpoint_file",
]

#: the layout of the state written by this version (bump when the saved layout changes); 2: the 8-bit format
FORMAT = 2
#: the key ``AdaRankGrad.state_dict()`` adds to torch's ``{"state", "param_groups"}``
STATE_KEY = "adarank"
#: settings whose change makes a saved state's layout invalid
_LAYOUT_SETTINGS = ("low_rank", "max_rank", "min_rank")
_MOMENTS = ("exp_avg", "exp_avg_sq")


def format_tag() -> dict[str, Any]:
    """The ``"adarank"`` entry of a state dict: the layout format and the package version that wrote it."""
    from .. import __version__  # noqa: PLC0415 (the package root imports this module's users)

    return {"format": FORMAT, "version": __version__}


def _saved_format(state_dict: dict[str, Any]) -> int:
    tag = state_dict.get(STATE_KEY)
    if tag is None:
        return 0  # untagged: lightning-adarank 0.1.0 before the tag; same layout as format 1
    if not isinstance(tag, dict) or not isinstance(tag.get("format"), int) or isinstance(tag.get("format"), bool):
        raise ValueError(f"AdaRankGrad state: malformed {STATE_KEY!r} tag {tag!r} (expected {format_tag()!r})")
    fmt = tag["format"]
    if fmt > FORMAT or fmt < 0:
        raise ValueError(
            f"AdaRankGrad state: written with state format {fmt} by lightning-adarank {tag.get('version', '?')};"
            f" this version ({format_tag()['version']}) reads formats 0..{FORMAT}. Upgrade lightning-adarank to"
            " load it."
        )
    return fmt


def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, Tensor) else None


def _fits(t: Any, want: tuple[int, ...]) -> bool:
    """A saved moment fits ``want``: that shape, or the 8-bit buffer of a tensor of that shape (:func:`quant.fits`)."""
    return _shape(t) == want or quant.fits(t, want)


def _check_param(where: str, p: Tensor, group: dict, saved: dict, projected: bool) -> None:
    shape = tuple(p.shape)
    if "basis" not in saved:
        if projected:
            if any(k in saved for k in _MOMENTS):
                raise ValueError(
                    f"AdaRankGrad state: {where} {shape} is projected here (min(shape) > max_rank="
                    f"{group['max_rank']}) but its saved state has full-size moments and no basis: a state from"
                    " another optimizer (e.g. AdamW) or one saved with a larger max_rank or low_rank=False"
                )
            return  # projected, first refresh not done yet (e.g. skipped on a non-finite gradient): no tensors
        for k in _MOMENTS:
            if k not in saved:
                raise ValueError(f"AdaRankGrad state: {where} {shape} lacks {k!r} in its saved state")
            if not _fits(saved[k], shape):
                raise ValueError(
                    f"AdaRankGrad state: {where} has shape {shape} but its saved {k} has shape {_shape(saved[k])}"
                    " (a state from another model?)"
                )
        return
    if not projected:
        raise ValueError(
            f"AdaRankGrad state: {where} {shape} has a saved projection basis but is not projected here"
            f" (low_rank={group['low_rank']}, max_rank={group['max_rank']}): a state from another model or settings"
        )
    s = min(shape)
    basis = _shape(saved["basis"])
    if basis is not None and len(basis) == 1 and "rank" in saved and _fits(saved["basis"], (s, int(saved["rank"]))):
        basis = (s, int(saved["rank"]))  # an 8-bit basis: flattened whole blocks of the (s, rank) matrix
    if basis is None or len(basis) != 2 or basis[0] != s:
        raise ValueError(
            f"AdaRankGrad state: {where} {shape} needs a basis of shape ({s}, r) but the saved basis has shape"
            f" {basis} (a state from another model?)"
        )
    width = basis[1]
    r = int(saved["rank"]) if "rank" in saved else width
    for rank in (width, r):  # the basis width, and the true rank of a basis padded to max_rank (FSDP2 states)
        if not group["min_rank"] <= rank <= min(group["max_rank"], s):
            raise ValueError(
                f"AdaRankGrad state: {where} {shape} has a saved rank-{rank} basis, outside [min_rank="
                f"{group['min_rank']}, max_rank={group['max_rank']}]"
            )
    if r != width and width != min(group["max_rank"], s):
        raise ValueError(f"AdaRankGrad state: {where} has saved rank {saved['rank']} but a rank-{width} basis")
    want = (width, shape[1]) if projection_side(shape) == "left" else (shape[0], width)
    for k in _MOMENTS:
        if not _fits(saved.get(k), want):
            raise ValueError(
                f"AdaRankGrad state: {where} {shape} with a rank-{r} basis needs {k} of shape {want}, saved"
                f" {_shape(saved.get(k))}"
            )


def check_state_dict(optimizer: Any, state_dict: Any) -> int:
    """Check ``state_dict`` against ``optimizer`` (an :class:`~lightning_adarank.AdaRankGrad`) before loading.

    Returns the saved format (0 for an untagged state). Raises ``ValueError`` naming the first mismatch (see the
    module docstring); changes nothing.
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("AdaRankGrad state: expected an optimizer state dict with 'state' and 'param_groups'")
    fmt = _saved_format(state_dict)
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"AdaRankGrad state: the checkpoint has {len(saved_groups)} parameter group(s), this optimizer"
            f" {len(groups)}"
        )
    saved_state = state_dict["state"]
    for gi, (sg, group) in enumerate(zip(saved_groups, groups)):
        if len(sg["params"]) != len(group["params"]):
            raise ValueError(
                f"AdaRankGrad state: parameter group {gi} has {len(sg['params'])} parameter(s) in the checkpoint,"
                f" {len(group['params'])} here"
            )
        for key in _LAYOUT_SETTINGS:
            if key in sg and sg[key] != group[key]:
                raise ValueError(
                    f"AdaRankGrad state: parameter group {gi} was saved with {key}={sg[key]!r}, this optimizer has"
                    f" {key}={group[key]!r}; the saved layout needs {key}={sg[key]!r} (build the optimizer with it)"
                )
        names, saved_names = group.get("param_names"), sg.get("param_names")
        for pi, (sid, p) in enumerate(zip(sg["params"], group["params"])):
            name = names[pi] if names else f"group{gi}.param{pi}"
            if names and saved_names and saved_names[pi] != names[pi]:
                raise ValueError(
                    f"AdaRankGrad state: parameter {pi} of group {gi} is {names[pi]!r} here but"
                    f" {saved_names[pi]!r} in the checkpoint"
                )
            saved = saved_state.get(sid)
            if saved:
                _check_param(f"parameter {name!r}", p, group, saved, optimizer.is_projected(p, group))
    return fmt


def _old_8bit(t: Any) -> bool:
    """A tensor of the formats-0/1 8-bit storage (torchao's ``OptimState8bit`` subclass)."""
    return isinstance(t, Tensor) and type(t) is not Tensor and type(t).__name__ == "OptimState8bit"


def migrate_state_dict(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every 8-bit tensor of formats 0–1 (torchao's ``OptimState8bit``, flattened blocks of
    256, ``v`` itself) decoded and re-stored in the current format at the group's ``state_bits`` /
    ``dense_state_bits`` (:mod:`.quant`); the input is not changed. A state with nothing to migrate is returned
    as it is. Raises ``ValueError`` when an old 8-bit tensor cannot be placed (no ``rank`` beside a basis)."""
    if not any(
        _old_8bit(v) for st in state_dict.get("state", {}).values() if isinstance(st, dict) for v in st.values()
    ):
        return state_dict
    out = {**state_dict, "state": {k: dict(st) for k, st in state_dict["state"].items()}}
    for sg, group in zip(state_dict["param_groups"], optimizer.param_groups):
        for sid, p in zip(sg["params"], group["params"]):
            st = out["state"].get(sid)
            if not st:
                continue
            projected = "basis" in st
            bits = group.get("state_bits", 32) if projected else group.get("dense_state_bits", 32)
            shape = tuple(p.shape)
            if projected:
                if "rank" not in st:
                    raise ValueError(f"AdaRankGrad state: parameter {sid} has an old 8-bit basis but no rank")
                r = int(st["rank"])
                shapes = {
                    "basis": (min(shape), r),
                    "exp_avg": projected_shape(shape, r),
                    "exp_avg_sq": projected_shape(shape, r),
                    "sketch": (min(shape), st.get("sketch_cols", 0)),
                }
            else:
                shapes = {"exp_avg": shape, "exp_avg_sq": shape}
            for key, old in list(st.items()):
                if not _old_8bit(old):
                    continue
                want = shapes.get(key)
                if want is None or math.prod(want) > old.numel() or math.prod(want) == 0:
                    raise ValueError(f"AdaRankGrad state: cannot migrate the old 8-bit {key!r} of parameter {sid}")
                value = old.dequantize().reshape(-1)[: math.prod(want)].reshape(want).float()
                if key == "basis":
                    st[key] = quant.store_basis(value, bits)
                else:
                    st[key] = quant.store(None, value, bits, signed=key != "exp_avg_sq", salt=st.get("step"))
    return out


class CheckpointFileError(RuntimeError):
    """A checkpoint file that cannot be read back intact (truncated, corrupted, or not a torch checkpoint)."""


def verify_checkpoint_file(path: Any) -> None:
    """Check that ``path`` is a complete torch checkpoint whose every entry matches its stored CRC-32.

    ``torch.save`` writes a zip archive with a CRC-32 per entry, but ``torch.load`` does not check them: a
    flipped byte inside a tensor loads silently as a wrong value. This reads the whole file once (about as
    fast as the disk) and raises :class:`CheckpointFileError` naming the file and what is wrong with it.
    """
    import os  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    path = os.fspath(path)
    size = os.path.getsize(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointFileError(
            f"checkpoint {path!r} ({size} bytes) is not a complete torch checkpoint: no zip directory at its end"
            " (truncated, e.g. a run killed while saving, or not written by torch.save)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # a damaged header or a short read
        raise CheckpointFileError(f"checkpoint {path!r} ({size} bytes) is corrupted: {err}") from err
    if bad is not None:
        raise CheckpointFileError(
            f"checkpoint {path!r} is corrupted: entry {bad!r} does not match its CRC-32 (the file changed after it"
            " was written)"
        )
