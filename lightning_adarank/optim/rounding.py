"""Deterministic stochastic rounding to 16-bit floats: the one place that rounds fp32 values into bf16/fp16.

Two users: the 16-bit optimizer *state* (:mod:`.quant`, ``state_bits=16``) and the **weights** themselves when a
model is trained in bf16 or fp16 (``Trainer(precision="bf16-true")``, or a model cast with ``.bfloat16()``).

**Why weights need it.** A bf16 weight has 8 significant bits: round-to-nearest drops every update smaller than
half its unit in the last place (ulp), i.e. ``|ΔW| < 2⁻⁹·|W|``. At ``lr = 1e-5`` an Adam update is about
``1e-5`` while a weight of 0.02 has a half-ulp of ``4e-5``: every update rounds back to the old weight and
training silently stalls. Stochastic rounding rounds up with probability equal to the dropped fraction, so the
expected stored weight is the exact fp32 result and small updates accumulate on average.

**Deterministic.** The random bits are a hash of (element index, ``salt``, ``kind``), with ``salt`` the step
counter (an int or a 0-d tensor, read on the device: no host synchronisation) and ``kind`` a stream number
(the moment kind for state, the parameter's index for weights). The result is a function of its inputs, so a
resumed run rounds exactly as the uninterrupted one, with no global random generator involved.

**Bounded memory.** :func:`add_stochastic_` works in row chunks of about :data:`CHUNK_ELEMENTS` elements: the
fp32 working copy of a 7B model's 32000 × 4096 embedding never exists at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "CHUNK_ELEMENTS",
    "LOW_PRECISION",
    "WEIGHT_KIND",
    "add_stochastic_",
    "assign_stochastic_",
    "bf16_stochastic",
    "stochastic_round",
]

#: elements per chunk of the weight writes (their transient memory: about 20 bytes per chunk element)
CHUNK_ELEMENTS = 1 << 18
#: ``kind`` of a weight's rounding stream is ``WEIGHT_KIND + parameter index`` (state kinds are 0, 1, 2)
WEIGHT_KIND = 1 << 16
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _i32(c: int) -> int:
    """A 32-bit constant as the signed int32 torch stores."""
    c &= 0xFFFFFFFF
    return c - (1 << 32) if c >= 1 << 31 else c


_GOLDEN, _M1, _M2, _SALT = _i32(0x9E3779B1), _i32(0x7FEB352D), _i32(0x846CA68B), _i32(0x85EBCA77)


def _hash32(h: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' "lowbias32": xor-shift-multiply) on int32 tensors; multiplications wrap
    modulo 2³², the shifts are logical (masked after torch's arithmetic shift)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _M1
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _M2
    return h ^ ((h >> 16) & 0xFFFF)


def _random16(shape: torch.Size, device: torch.device, salt: int | Tensor, kind: int, offset: int = 0) -> Tensor:
    """16 hashed random bits (int32 in ``[0, 65536)``) per element of a tensor of ``shape`` whose flat index
    starts at ``offset``: ``hash(index·φ ⊕ hash(salt·c + kind))``, all in int32 (a 0-d device tensor ``salt`` is
    never read on the host)."""
    if isinstance(salt, Tensor):
        salt_t = salt.reshape(()).to(device=device, dtype=torch.int64).to(torch.int32)
    else:
        salt_t = torch.tensor(_i32(int(salt)), dtype=torch.int32, device=device)
    key = _hash32(salt_t * _SALT + _i32(kind * 0x27D4EB2F + 0x165667B1))
    numel = shape.numel()
    idx = torch.arange(
        offset, offset + numel, device=device, dtype=torch.int64 if offset + numel > 2**31 else torch.int32
    )
    return (_hash32(idx.to(torch.int32) * _GOLDEN ^ key) & 0xFFFF).view(shape)


def bf16_stochastic(x: Tensor, salt: int | Tensor, kind: int, offset: int = 0) -> Tensor:
    """``x`` (fp32) rounded to bf16 up or down (in magnitude) with probability given by the 16 dropped bits:
    adding 16 random bits to the bit pattern then truncating rounds up exactly when they carry into the kept
    bits (int32 arithmetic: the sign bit is never reached from a finite value). ``offset``: the flat index of
    ``x``'s first element in the tensor it is a chunk of."""
    bits = x.float().contiguous().view(torch.int32)
    rounded = (bits + _random16(x.shape, x.device, salt, kind, offset)) & _i32(0xFFFF0000)
    return rounded.view(torch.float32).bfloat16()


def _fp16_stochastic(x: Tensor, salt: int | Tensor, kind: int, offset: int = 0) -> Tensor:
    """``x`` (fp32) rounded to one of its two neighbouring fp16 values, the far one with probability
    ``|x − near| / |far − near|`` (fp16's exponent range differs from fp32's: no bit truncation here)."""
    near = x.half()
    nf = near.float()
    toward = torch.where(nf > x, float("-inf"), float("inf")).half()
    far = torch.nextafter(near, toward)
    gap = (far.float() - nf).abs()
    frac = torch.where(gap > 0, (x - nf).abs() / gap, 0.0)
    u = _random16(x.shape, x.device, salt, kind, offset).float() / 65536.0
    out = torch.where(u < frac, far, near)
    return torch.where(torch.isfinite(x), out, near)


def stochastic_round(x: Tensor, dtype: torch.dtype, salt: int | Tensor, kind: int, offset: int = 0) -> Tensor:
    """``x`` (fp32) stochastically rounded to ``dtype`` (bf16 or fp16): each result is one of the two neighbouring
    values of ``dtype`` and its expectation over the hash is ``x`` (see the module docstring)."""
    if dtype == torch.bfloat16:
        return bf16_stochastic(x, salt, kind, offset)
    if dtype == torch.float16:
        return _fp16_stochastic(x.float().contiguous(), salt, kind, offset)
    raise ValueError(f"stochastic rounding goes to bfloat16 or float16, not {dtype}")


def _rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0] if t.dim() >= 1 else 1, -1)


def _write_(weight: Tensor, new_rows: Callable[[int, int], Tensor], salt: int | Tensor | None, kind: int) -> None:
    """``W[r0:r1] ← round(new_rows(r0, r1))`` over chunks of rows of the contiguous 16-bit ``W``."""
    w2 = _rows(weight)
    rows, cols = w2.shape[0], max(w2.shape[1], 1)
    step = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        new = new_rows(r0, r1)
        w2[r0:r1].copy_(new if salt is None else stochastic_round(new, weight.dtype, salt, kind, offset=r0 * cols))


def _check(weight: Tensor) -> None:
    if weight.dtype not in LOW_PRECISION:
        raise ValueError(f"stochastic weight writes are for bf16/fp16 weights, got {weight.dtype}")


def add_stochastic_(
    weight: Tensor,
    update: Tensor | Callable[[int, int], Tensor],
    *,
    decay: float | Tensor = 1.0,
    salt: int | Tensor | None,
    kind: int,
) -> None:
    """``W ← round(decay·W + U)`` in place for a bf16/fp16 ``W``, computed in fp32 a chunk of rows at a time.

    ``update``: the fp32 ``U`` of ``W``'s shape, or a function ``(row_start, row_stop) → U[row_start:row_stop]``
    (the back-projection computes its product a chunk at a time, so no weight-sized fp32 tensor exists).
    ``salt``: the step counter that seeds the stochastic rounding; ``None`` rounds to nearest (the setting off).
    ``kind``: the rounding stream (:data:`WEIGHT_KIND` + the parameter's index). ``decay`` may be a 0-d tensor.
    """
    _check(weight)
    if not weight.is_contiguous():
        if weight.dim() == 2 and weight.mT.is_contiguous() and isinstance(update, Tensor):
            add_stochastic_(weight.mT, update.mT, decay=decay, salt=salt, kind=kind)
            return
        new = weight.float().mul_(decay).add_(update if isinstance(update, Tensor) else update(0, weight.shape[0]))
        weight.copy_(new if salt is None else stochastic_round(new, weight.dtype, salt, kind))
        return
    w2 = _rows(weight)
    u2 = _rows(update) if isinstance(update, Tensor) else None

    def new_rows(r0: int, r1: int) -> Tensor:
        new = w2[r0:r1].float()
        if not (isinstance(decay, (int, float)) and decay == 1):
            new.mul_(decay)
        return new.add_((u2[r0:r1] if u2 is not None else update(r0, r1)).reshape(r1 - r0, -1))

    _write_(weight, new_rows, salt, kind)


def assign_stochastic_(weight: Tensor, value: Tensor, *, salt: int | Tensor | None, kind: int) -> None:
    """``W ← round(V)`` in place for a bf16/fp16 ``W`` and an fp32 ``V`` of its shape (e.g. an fp32 working copy
    that torch's AdamW kernel stepped), a chunk of rows at a time; ``salt=None`` rounds to nearest."""
    _check(weight)
    if not weight.is_contiguous():
        weight.copy_(value if salt is None else stochastic_round(value.float(), weight.dtype, salt, kind))
        return
    v2 = _rows(value)
    _write_(weight, lambda r0, r1: v2[r0:r1].float(), salt, kind)
