"""Low-bit storage of Adam's moments (``state_bits``): one *load* and one *store* point per moment.

The optimizer keeps its math in fp32: before a step it **loads** a moment (dequantizes it to an fp32 working
tensor), runs torch's Adam kernel on it, then **stores** it back (quantizes). At a subspace refresh the moment
transform runs on loaded values and the result is stored anew. At ``bits=32`` loading returns the stored
tensor itself and storing is a no-op, so the 32-bit path is exactly the unquantized optimizer.

Formats (the quantizers are torchao's, ``torchao.optim``; nothing here is a hand-written quantizer):

* ``32``: fp32, as before.
* ``16``: bf16, written with torchao's **stochastic rounding** (``_fp32_to_bf16_sr``). Round-to-nearest would
  freeze ``v`` (``β2 = 0.999`` changes it by 0.1 %, below bf16's 0.4 % resolution); stochastic rounding is
  unbiased. It draws from torch's global generator.
* ``8``: torchao's :class:`~torchao.optim.subclass_8bit.OptimState8bit` — blockwise 8-bit codes (one uint8 per
  element) with one fp32 absmax scale per block of :data:`BLOCK_SIZE` elements and the dynamic-tree code map
  (signed for ``m``, unsigned for ``v``), the format of torchao's ``AdamW8bit`` and of Dettmers et al. 2021.
  The code map (256 fp32) is shared by every moment of a device and sign.

Moments too small for a block: a moment with fewer than :data:`MIN_QUANT_NUMEL` elements (one block, 256)
stays fp32 at ``bits=8``. Every larger moment is quantized; one whose size is not a multiple of the block is
stored **flattened and zero-padded** to whole blocks (under one block, < 256 bytes, of padding), so adaptive
ranks and odd widths (LLaMA's 1376) never fall back to fp32; the stored tensor is then 1-D and :func:`load`
takes the moment's shape. This departs from torchao's and bitsandbytes' ``AdamW8bit``, which leave tensors
under 4,096 elements in fp32: their reason is a 1 KiB code map per tensor, which here is shared, and with
4,096 the adaptive low-rank moments (``r × 768`` with ``r ≤ 5``) and BERT's biases would stay fp32 and hold a
third of the 8-bit state.

The projection basis ``P`` (orthonormal columns, entries roughly Gaussian, not heavy-tailed like a moment) is
stored by :func:`store_basis`: bf16 at 16 bits, and at 8 bits the same blockwise format with a **linear** code map
(256 evenly spaced codes in ``[−1, 1]`` of each block's absmax) instead of the dynamic tree, whose resolution is
spent near zero. Measured on orthonormal ``P`` (192 × 24, 768 × 8, 768 × 48): relative error 0.66 % (linear)
against 1.1 % (dynamic tree) and 0.17 % (bf16), and ``‖PᵀP − I‖_F`` of 0.3–3.5 % (192 × 48). The step uses the loaded ``P`` as
it is: a projection, its adjoint and the moment rotation are all linear in ``P``, so a slightly non-orthonormal
basis only changes the subspace's coordinates a little, and the update stays inside its span.

Checkpoints: the 8-bit state holds ``OptimState8bit`` tensors; ``torch.load(..., weights_only=True)`` needs
exactly the allow-list :func:`weights_only_globals` (``[OptimState8bit]``): pass it to
``torch.serialization.safe_globals(...)`` or call :func:`allow_weights_only_loading` once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "BLOCK_SIZE", "MIN_QUANT_NUMEL", "STATE_BITS", "allow_weights_only_loading", "load", "store", "store_basis",
    "stored_bytes", "weights_only_globals", "zeros",
]

STATE_BITS = (32, 16, 8)
BLOCK_SIZE = 256  #: elements per fp32 scale at 8 bits (torchao's default)
MIN_QUANT_NUMEL = BLOCK_SIZE  #: smaller moments stay fp32 at 8 bits (torchao/bnb use 4096: see above)

_QMAPS: dict[tuple[str, bool], Tensor] = {}


def _state8():
    try:
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError as err:  # pragma: no cover - torchao is a core dependency
        raise ImportError("state_bits=8 needs torchao (pip install torchao)") from err
    return OptimState8bit


def weights_only_globals() -> list:
    """The globals ``torch.load(weights_only=True)`` needs for an 8-bit state: ``[OptimState8bit]``."""
    return [_state8()]


def allow_weights_only_loading() -> None:
    """Register :func:`weights_only_globals` with ``torch.serialization.add_safe_globals``."""
    torch.serialization.add_safe_globals(weights_only_globals())


def _qmap(device: torch.device, signed: bool, linear: bool = False) -> Tensor:
    key = (str(device), signed, linear)
    if key not in _QMAPS:
        if linear:  # evenly spaced codes (the basis); sorted, as torchao's binary search needs
            _QMAPS[key] = torch.linspace(-1.0 if signed else 0.0, 1.0, 256, dtype=torch.float32, device=device)
        else:
            from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

            _QMAPS[key] = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned(), dtype=torch.float32,
                                       device=device)
    return _QMAPS[key]


def _quantized(numel: int, bits: int) -> bool:
    return bits == 8 and numel >= MIN_QUANT_NUMEL


def zeros(shape: tuple[int, ...], bits: int, *, signed: bool, device: torch.device | str, linear: bool = False) -> Tensor:
    """Storage for a fresh (all-zero) moment of ``shape`` at ``bits``; ``signed=False`` for ``v``; ``linear``: the
    linear code map (the basis) instead of the dynamic tree."""
    numel = math.prod(shape)
    if bits == 32 or (bits == 8 and not _quantized(numel, bits)):
        return torch.zeros(shape, dtype=torch.float32, device=device)
    if bits == 16:
        return torch.zeros(shape, dtype=torch.bfloat16, device=device)
    padded = -(-numel // BLOCK_SIZE) * BLOCK_SIZE
    codes = torch.zeros(padded, dtype=torch.uint8, device=device)
    scale = torch.zeros(padded // BLOCK_SIZE, dtype=torch.float32, device=device)
    return _state8()(codes, scale, _qmap(codes.device, signed, linear), signed, dtype=torch.float32)


def is_fp32(stored: Tensor) -> bool:
    """Whether a stored moment is a plain fp32 tensor (or a DTensor of one: FSDP2 state), not 8-bit blocks."""
    return stored.dtype == torch.float32 and type(stored).__name__ != "OptimState8bit"


def load(stored: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The moment as an fp32 tensor of ``shape``: ``stored`` itself when it is fp32, else a dequantized copy."""
    if is_fp32(stored):
        return stored
    if stored.dtype == torch.bfloat16:
        return stored.float()
    numel = math.prod(shape)
    return stored.dequantize().reshape(-1)[:numel].view(shape)


def store(stored: Tensor | None, value: Tensor, bits: int, *, signed: bool) -> Tensor:
    """Write the fp32 ``value`` into ``stored`` (quantizing it), or into new storage when ``stored`` is ``None``
    or holds another size (a rank change at a refresh). Returns the storage (``value`` itself where fp32)."""
    numel = value.numel()
    if bits == 32 or not (bits == 16 or _quantized(numel, bits)):
        return value if value.dtype == torch.float32 else value.float()
    if bits == 16:
        if stored is None or stored.dtype != torch.bfloat16 or stored.shape != value.shape:
            stored = zeros(tuple(value.shape), bits, signed=signed, device=value.device)
        from torchao.optim.quant_utils import _fp32_to_bf16_sr

        stored.copy_(_fp32_to_bf16_sr(value.float().contiguous()))
        return stored
    padded = -(-numel // BLOCK_SIZE) * BLOCK_SIZE
    if stored is None or type(stored) is Tensor or stored.numel() != padded:
        stored = zeros(tuple(value.shape), bits, signed=signed, device=value.device)
    flat = value.reshape(-1).float()
    if padded != numel:
        flat = torch.cat([flat, flat.new_zeros(padded - numel)])
    stored.copy_(flat)  # torchao: per-block absmax scale, then the nearest code of the map
    return stored


def store_basis(basis: Tensor, bits: int) -> Tensor:
    """Storage of a projection basis at ``bits``: fp32 at 32, bf16 (round to nearest) at 16, 8-bit blocks with the
    linear code map at 8 (bases under one block stay fp32). :func:`load` reads it back given ``(s, r)``."""
    if bits == 32 or (bits == 8 and not _quantized(basis.numel(), bits)):
        return basis if basis.dtype == torch.float32 else basis.float()
    if bits == 16:
        return basis.bfloat16()
    stored = zeros(tuple(basis.shape), 8, signed=True, device=basis.device, linear=True)
    return store(stored, basis, 8, signed=True)


def stored_bytes(stored: Tensor) -> int:
    """Bytes a stored moment really holds (codes + scales for 8-bit; the shared code map not counted)."""
    if type(stored) is Tensor:
        return stored.numel() * stored.element_size()
    return stored.codes.numel() + stored.scale.numel() * stored.scale.element_size()
