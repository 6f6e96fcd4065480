"""Low-bit storage of Adam's moments (``state_bits``): one *load* and one *store* point per moment.

The optimizer keeps its math in fp32: before a step it **loads** a moment (decodes it to an fp32 working
tensor), runs torch's Adam kernel on it, then **stores** it back (encodes it). At a subspace refresh the moment
transform runs on loaded values and the result is stored anew. At ``bits=32`` loading returns the stored
tensor itself and storing is a no-op, so the 32-bit path is exactly the unquantized optimizer.

Formats, every one a **plain tensor** (no tensor subclass: checkpoints load with ``weights_only=True`` and with
the callable ``map_location`` Lightning's loader passes):

* ``32``: fp32, as before.
* ``16``: bf16, written with **stochastic rounding** (round-to-nearest would freeze ``v``: ``β2 = 0.999`` moves
  it by 0.1 %, under bf16's 0.4 % resolution). The random bits are a hash of (element index, ``salt``, sign
  kind), with ``salt`` the step counter the caller passes: the rounding is unbiased over steps and elements,
  yet a function of the state, so a resumed run rounds exactly as the uninterrupted one (no global RNG).
* ``8``: one ``uint8`` buffer per tensor: an 8-byte header (magic ``b"AQ"``, format, kind, block size), then
  one fp32 absmax scale per block, then one code per element (the 256-entry dynamic-tree map of Dettmers et
  al. 2021, built by torchao's ``create_dynamic_map``; the nearest code found by torchao's
  ``quantize_8bit_with_qmap``). The blocks follow the **rows** of the moment (``shape[0]``; an embedding's
  tokens): rows of ≥ 256 elements in blocks of 256, rows of 32–255 elements one block each (fp32 absmax
  scales: 4/cols bytes per element, 2 % for LLaMA-tiny's 192-wide embedding rows),
  narrower rows (a right-projected moment ``m × r``, ``r < 32``) one block each with a **power-of-two scale in
  one byte** (``2^(e−127)`` at or above the row's absmax: ``1 + 1/r`` bytes per element, the same as fp32
  scales per 32 elements at ``r = 8``). A row the batch never touched (an unused token) therefore never shares
  a scale with a used one, rows of very different sizes (6 decades in the tests) each keep their own
  precision, and zeros decode as exact zeros (0 is a code).
  The second moment is stored as **√v** (the unsigned map): ``|m| ≤ C·√v`` (below), so ``m`` and ``√v`` have
  the same units and range and a ``v`` too small for its block no longer rounds to 0 under a sizeable ``m``;
  :func:`load` returns ``v`` (the square). The stored-state Adam kernel additionally clamps ``m̂/(√v̂+ε)`` by
  Adam's own bound (:func:`adam_ratio_bound`), which no exact state exceeds.

The previous 8-bit format (torchao's ``OptimState8bit``, blocks of 256 across rows, ``v`` itself) blew the
update up on an embedding's sparse rows (a small ``v`` rounded to 0 under a non-zero ``m``; on
``benchmarks/lowbit_update.py``'s BERT the worst embedding row moved 20× its 32-bit update, the whole embedding
1.40×; now 1.06× and 1.000×); checkpoint format 2 (:mod:`.checkpoint`) marks the new layout and migrates the
old one.

Moments too small for a block: under :data:`MIN_QUANT_NUMEL` elements a moment stays fp32 at ``bits=8``.

The projection basis ``P`` (orthonormal columns, entries roughly Gaussian) is stored by :func:`store_basis`:
bf16 at 16 bits, and at 8 bits the same buffer with a **linear** code map (256 evenly spaced codes in
``[−1, 1]`` of each block's absmax), flattened in blocks of 256 (its rows are the short side's, not sparse).

:func:`state_nbytes` is the one accounting of bytes as stored (header, scales and codes at 8 bits).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .rounding import bf16_stochastic

__all__ = [
    "BLOCK_SIZE",
    "MIN_QUANT_NUMEL",
    "NARROW_BLOCK",
    "STATE_BITS",
    "adam_ratio_bound",
    "allow_weights_only_loading",
    "fits",
    "is_fp32",
    "load",
    "state_nbytes",
    "store",
    "store_basis",
    "weights_only_globals",
    "zeros",
]

STATE_BITS = (32, 16, 8)
BLOCK_SIZE = 256  #: elements per fp32 scale along a row of ≥ 256 elements (and for the basis)
NARROW_BLOCK = 32  #: rows under this many elements get a one-byte power-of-two scale each (fp32 from here up)
MIN_QUANT_NUMEL = BLOCK_SIZE  #: smaller moments stay fp32 at 8 bits
HEADER_BYTES = 8  #: magic (2), format, kind, block (0: 256), exp-scale flag, 2 reserved (4-aligned)
_MAGIC = (0x41, 0x51)  # "AQ"
_FORMAT = 1
SIGNED, SQRT, LINEAR = 0, 1, 2  #: kinds: signed tree (m, sketch), √v on the unsigned tree (v), linear (basis)

_QMAPS: dict[tuple[str, int], Tensor] = {}


def weights_only_globals() -> list:
    """The globals ``torch.load(weights_only=True)`` needs for a low-bit state: none (plain tensors only).
    Kept for code written against the earlier tensor-subclass format."""
    return []


def allow_weights_only_loading() -> None:
    """No-op kept for compatibility: every stored format is a plain tensor (see :func:`weights_only_globals`)."""


def _qmap(device: torch.device, kind: int) -> Tensor:
    key = (str(device), kind)
    if key not in _QMAPS:
        if kind == LINEAR:
            q = torch.linspace(-1.0, 1.0, 256, dtype=torch.float32)
        else:
            from torchao.optim.quant_utils import create_dynamic_map

            q = torch.tensor(create_dynamic_map(signed=kind == SIGNED), dtype=torch.float32).sort().values
        _QMAPS[key] = q.to(device)
    return _QMAPS[key]


def _layout(shape: tuple[int, ...], kind: int) -> tuple[int, int, int, bool]:
    """``(rows, cols, block, exp_scale)``: the tensor read as ``rows × cols`` with blocks of ``block`` along each
    row; ``exp_scale``: one block per (narrow) row with a power-of-two scale stored in one byte."""
    numel = math.prod(shape)
    if kind == LINEAR:
        return 1, numel, BLOCK_SIZE, False
    rows = shape[0] if len(shape) >= 2 else 1
    cols = numel // max(rows, 1)
    if cols >= BLOCK_SIZE:
        return rows, cols, BLOCK_SIZE, False
    if cols >= NARROW_BLOCK:
        return rows, cols, cols, False
    return rows, cols, cols, True


def _nbytes(shape: tuple[int, ...], kind: int) -> tuple[int, int]:
    """``(scales, total bytes)`` of the 8-bit buffer of a tensor of ``shape``."""
    rows, cols, block, exp_scale = _layout(shape, kind)
    nscale = rows * -(-cols // block)
    return nscale, HEADER_BYTES + (1 if exp_scale else 4) * nscale + math.prod(shape)


def _header_bytes(shape: tuple[int, ...], kind: int) -> list[int]:
    _, _, block, exp_scale = _layout(shape, kind)
    return [*_MAGIC, _FORMAT, kind, block if block < 256 else 0, int(exp_scale), 0, 0]


def _quantized(numel: int, bits: int) -> bool:
    return bits == 8 and numel >= MIN_QUANT_NUMEL


def _kind(signed: bool, linear: bool = False) -> int:
    return LINEAR if linear else (SIGNED if signed else SQRT)


def _kind_of(buf: Tensor) -> int:
    """The kind of an 8-bit buffer; ``ValueError`` when it is not one."""
    h = buf[:HEADER_BYTES].tolist()
    if buf.dim() != 1 or len(h) < HEADER_BYTES or tuple(h[:2]) != _MAGIC or h[2] != _FORMAT or h[3] not in (0, 1, 2):
        raise ValueError(f"not an 8-bit state buffer of lightning-adarank (header {h})")
    return h[3]


def zeros(
    shape: tuple[int, ...], bits: int, *, signed: bool, device: torch.device | str, linear: bool = False
) -> Tensor:
    """Storage for a fresh (all-zero) moment of ``shape`` at ``bits``; ``signed=False`` for ``v``; ``linear``: the
    linear code map (the basis) instead of the dynamic tree."""
    numel = math.prod(shape)
    if bits == 32 or (bits == 8 and not _quantized(numel, bits)):
        return torch.zeros(shape, dtype=torch.float32, device=device)
    if bits == 16:
        return torch.zeros(shape, dtype=torch.bfloat16, device=device)
    kind = _kind(signed, linear)
    return _encode(torch.zeros(shape, dtype=torch.float32, device=device), kind)


def is_fp32(stored: Tensor) -> bool:
    """Whether a stored moment is a plain fp32 tensor (or a DTensor of one: FSDP2 state)."""
    return stored.dtype == torch.float32


def fits(stored: object, shape: tuple[int, ...]) -> bool:
    """Whether ``stored`` is a valid storage of a tensor of ``shape`` (any format; checkpoints check with it)."""
    if not isinstance(stored, Tensor):
        return False
    if tuple(stored.shape) == tuple(shape) and stored.dtype in (torch.float32, torch.bfloat16):
        return True
    if stored.dtype != torch.uint8 or stored.dim() != 1 or stored.numel() < HEADER_BYTES:
        return False
    try:
        kind = _kind_of(stored)
    except ValueError:
        return False
    return (
        stored[:HEADER_BYTES].tolist() == _header_bytes(tuple(shape), kind)
        and stored.numel() == _nbytes(tuple(shape), kind)[1]
    )


def load(stored: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The tensor as fp32 of ``shape``: ``stored`` itself when it is fp32, else a decoded copy (``v``, not √v,
    for a second moment)."""
    if is_fp32(stored):
        return stored
    if stored.dtype == torch.bfloat16:
        return stored.float()
    shape = tuple(shape)
    kind = _kind_of(stored)
    rows, cols, block, exp_scale = _layout(shape, kind)
    nscale, total = _nbytes(shape, kind)
    if stored.numel() != total or stored[:HEADER_BYTES].tolist() != _header_bytes(shape, kind):
        raise ValueError(f"8-bit state of {stored.numel()} bytes does not hold a tensor of shape {shape} ({total})")
    width = 1 if exp_scale else 4
    raw = stored[HEADER_BYTES : HEADER_BYTES + width * nscale]
    if exp_scale:  # one byte per row: the scale 2^(byte − 127)
        scale = torch.ldexp(torch.ones(rows, 1, device=stored.device), raw.view(rows, 1).long() - 127)
    else:
        scale = raw.view(torch.float32).view(rows, -1).repeat_interleave(block, 1)[:, :cols]
    codes = stored[HEADER_BYTES + width * nscale :].view(rows, cols)
    out = _qmap(stored.device, kind)[codes.long()] * scale
    if kind == SQRT:
        out.square_()
    return out.view(shape)


def _encode(value: Tensor, kind: int, out: Tensor | None = None) -> Tensor:
    from torchao.optim.quant_utils import quantize_8bit_with_qmap

    shape = tuple(value.shape)
    rows, cols, block, exp_scale = _layout(shape, kind)
    nscale, total = _nbytes(shape, kind)
    x = value.detach().reshape(rows, cols).float()
    if kind == SQRT:
        x = x.clamp(min=0).sqrt()
    nb = -(-cols // block)
    blocks = torch.nn.functional.pad(x, (0, nb * block - cols)).view(rows, nb, block)
    scale = blocks.abs().amax(-1)
    if exp_scale:  # the power of two at or above the row's absmax (a row's one number keeps 8 bits of its own)
        expo = (torch.frexp(scale).exponent.long() + 127).clamp(1, 254)
        scale = torch.ldexp(torch.ones_like(scale), expo - 127)
    normed = blocks / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
    codes = quantize_8bit_with_qmap(normed, _qmap(value.device, kind)).view(rows, nb * block)[:, :cols]
    if out is None or out.dtype != torch.uint8 or out.numel() != total:
        out = torch.empty(total, dtype=torch.uint8, device=value.device)
    out[:HEADER_BYTES] = torch.tensor(_header_bytes(shape, kind), dtype=torch.uint8)
    width = 1 if exp_scale else 4
    scales = out[HEADER_BYTES : HEADER_BYTES + width * nscale]
    (scales.copy_(expo.reshape(-1)) if exp_scale else scales.view(torch.float32).copy_(scale.reshape(-1)))
    out[HEADER_BYTES + width * nscale :].view(rows, cols).copy_(codes)
    return out


def store(stored: Tensor | None, value: Tensor, bits: int, *, signed: bool, salt: int | Tensor | None = None) -> Tensor:
    """Write the fp32 ``value`` into ``stored`` (encoding it), or into new storage when ``stored`` is ``None``
    or holds another size (a rank change at a refresh). Returns the storage (``value`` itself where fp32).

    ``signed=False``: a second moment (non-negative; stored as √v at 8 bits). ``salt``: the step counter (an int
    or a 0-d tensor), which seeds the stochastic rounding at 16 bits (see the module docstring)."""
    numel = value.numel()
    if bits == 32 or not (bits == 16 or _quantized(numel, bits)):
        return value if value.dtype == torch.float32 else value.float()
    kind = _kind(signed)
    if bits == 16:
        rounded = bf16_stochastic(value.float(), 0 if salt is None else salt, kind)
        if stored is None or stored.dtype != torch.bfloat16 or stored.shape != value.shape:
            return rounded
        return stored.copy_(rounded)
    return _encode(value, kind, stored)


def store_basis(basis: Tensor, bits: int) -> Tensor:
    """Storage of a projection basis at ``bits``: fp32 at 32, bf16 (round to nearest) at 16, the 8-bit buffer with
    the linear code map at 8 (bases under one block stay fp32). :func:`load` reads it back given ``(s, r)``."""
    if bits == 32 or (bits == 8 and not _quantized(basis.numel(), bits)):
        return basis if basis.dtype == torch.float32 else basis.float()
    if bits == 16:
        return basis.bfloat16()
    return _encode(basis, LINEAR)


def state_nbytes(value: object) -> int:
    """Bytes a stored state tensor really holds, as stored: every format here is a plain tensor, so its
    ``numel × element_size`` (at 8 bits header, scales and codes; the shared code maps not counted); the local
    shard of a DTensor (FSDP2); ``0`` for anything that is not a tensor."""
    if not isinstance(value, Tensor):
        return 0
    local = value.to_local() if hasattr(value, "to_local") else value
    if type(local) is not Tensor and hasattr(local, "__tensor_flatten__"):  # a subclass (e.g. an old 8-bit state)
        names, _ = local.__tensor_flatten__()
        return sum(state_nbytes(getattr(local, n)) for n in names)
    return local.numel() * local.element_size()


def adam_ratio_bound(step: Tensor | int, beta1: float, beta2: float) -> Tensor | float:
    r"""The largest ``|m̂_t| / √v̂_t`` exact Adam moments can reach at step ``t`` (elementwise, any gradients).

    With ``m_t = (1−β1) Σ_{i≤t} β1^{t−i} g_i`` and ``v_t = (1−β2) Σ β2^{t−i} g_i²``, Cauchy–Schwarz on
    ``Σ (β1^{k}/β2^{k/2})·(β2^{k/2} g)`` gives ``|m_t| ≤ (1−β1) √(Σ_{k<t} q^k) √(v_t/(1−β2))`` with
    ``q = β1²/β2``; with the bias corrections ``m̂ = m/(1−β1^t)``, ``v̂ = v/(1−β2^t)``:

    ``|m̂_t|/√v̂_t ≤ (1−β1)/(1−β1^t) · √(Σ_{k<t} q^k) · √((1−β2^t)/(1−β2))``

    (1 at ``t = 1``; 7.27 as ``t → ∞`` for β = (0.9, 0.999)). Equality needs gradients growing as ``g_i ∝ (β2/β1)^i``, so
    decoded moments whose ratio exceeds it are quantization error, which the stored-state kernel clamps.
    A moment rotated into a new subspace (``transform_moments``) can exceed it by at most ``√r``; the kernel
    passes that factor."""
    t = step.double() if isinstance(step, Tensor) else float(step)
    q = beta1 * beta1 / beta2
    powq = q**t if not isinstance(t, Tensor) else torch.pow(torch.full_like(t, q), t)
    geo = (1 - powq) / (1 - q) if q != 1 else t
    pow1 = beta1**t if not isinstance(t, Tensor) else torch.pow(torch.full_like(t, beta1), t)
    pow2 = beta2**t if not isinstance(t, Tensor) else torch.pow(torch.full_like(t, beta2), t)
    bound = (1 - beta1) / (1 - pow1) * (geo * (1 - pow2) / (1 - beta2)) ** 0.5
    return bound.float() if isinstance(bound, Tensor) else bound
