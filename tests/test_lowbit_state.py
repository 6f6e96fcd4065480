"""Low-bit state bookkeeping (issue 25): one accounting of bytes as stored, the 8-bit layout against its
definition, deterministic 16-bit rounding, and old (format 1, torchao subclass) 8-bit checkpoints migrated."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch
from torch import nn

from lightning_adarank import AdaRankGrad, param_groups
from lightning_adarank.monitoring.history import memory_metrics, rank_metrics
from lightning_adarank.optim import quant
from lightning_adarank.optim.baselines import optimizer_state_bytes
from lightning_adarank.optim.checkpoint import FORMAT


def _model():
    torch.manual_seed(0)
    return nn.ModuleDict({"emb": nn.Embedding(512, 64), "up": nn.Linear(64, 300), "down": nn.Linear(300, 16)})


def _train(model, opt, steps=4):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 512, (16, 6), generator=g)
        out = model["down"](torch.tanh(model["up"](model["emb"](ids).mean(1))))
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()


def _opt(model, bits):
    return AdaRankGrad(
        param_groups(model, include_embeddings=True),
        lr=1e-2,
        max_rank=4,
        min_gap=2,
        max_gap=3,
        state_bits=bits,
        dense_state_bits=bits,
    )


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_state_bytes_are_the_bytes_as_stored(bits):
    model = _model()
    opt = _opt(model, bits)
    _train(model, opt)
    # the reference: the size of what torch.save writes for each state tensor's storage
    stored = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                buf = io.BytesIO()
                torch.save(v.clone(), buf)
                with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:  # torch.save's archive: one data entry
                    stored += sum(i.file_size for i in zf.infolist() if "/data/" in i.filename)
    assert opt.state_bytes() == stored
    assert optimizer_state_bytes(opt) == stored
    assert memory_metrics([opt])["optimizer/state_bytes"] == stored
    if bits == 8:  # the layout, from its definition (quant's docstring), for three tensors
        st_up, st_emb = opt.state[model["up"].weight], opt.state[model["emb"].weight]
        r = int(st_up["rank"])
        # up.weight (300 × 64) is right-projected: moments 300 × r, narrow rows, one exponent byte per row
        assert quant.state_nbytes(st_up["exp_avg"]) == 8 + 300 + 300 * r
        # the embedding (512 × 64): moments 512 × r, the same; its basis 64 × r: fp32 under one block
        assert quant.state_nbytes(st_emb["exp_avg_sq"]) == 8 + 512 + 512 * int(st_emb["rank"])
        # the 300-element bias: one row, blocks of 256: two fp32 scales
        assert quant.state_nbytes(opt.state[model["up"].bias]["exp_avg"]) == 8 + 2 * 4 + 300
        # the sketch (64 × k, k = max_rank + oversample) is stored too, and counted
        assert st_up["sketch"].dtype == torch.uint8


def test_reduction_figures_include_the_sketch():
    model = _model()
    opt = _opt(model, 32)
    _train(model, opt, 1)
    infos = opt.subspaces()
    st = opt.state[model["up"].weight]
    info = infos["up.weight"]
    assert info.sketch_numel == st["sketch"].numel() == 64 * st["sketch"].shape[1]
    assert (
        info.state_numel()
        == st["basis"].numel() + st["exp_avg"].numel() + st["exp_avg_sq"].numel() + st["sketch"].numel()
    )
    state = sum(
        s["basis"].numel() + s["exp_avg"].numel() + s["exp_avg_sq"].numel() + s["sketch"].numel()
        for p, s in opt.state.items()
        if "basis" in s
    )
    galore = sum(4 * (min(p.shape) + 2 * max(p.shape)) for p, s in opt.state.items() if "basis" in s)
    assert rank_metrics(opt)["adarank/state_reduction_vs_galore"] == pytest.approx(1 - state / galore)
    m2 = _model()
    low = _opt(m2, 8)
    _train(m2, low, 1)
    assert low.subspaces()["up.weight"].sketch_numel == 64 * low.state[m2["up"].weight]["sketch_cols"]


def test_16bit_rounding_is_deterministic_and_unbiased():
    x = torch.full((50_000,), 1.0 + 2**-10)  # bf16 step at 1 is 2^-7: rounds up with probability 1/8
    a = quant.store(None, x, 16, signed=False, salt=torch.tensor(7.0))
    assert torch.equal(a, quant.store(None, x, 16, signed=False, salt=7))  # a function of (value, index, salt)
    b = quant.store(None, x, 16, signed=False, salt=8)
    assert not torch.equal(a, b)
    up = torch.stack([quant.store(None, x[:500], 16, signed=False, salt=s).float() for s in range(200)])
    share = float((up > 1.0).float().mean())  # 100,000 roundings over salts and indices
    assert abs(share - 1 / 8) < 0.005, share


def test_old_8bit_checkpoint_is_migrated():
    """A format-1 state holding torchao's ``OptimState8bit`` (the earlier 8-bit storage: flattened blocks of 256,
    ``v`` itself) loads: it is decoded and stored in the current format, and training continues."""
    from torchao.optim.subclass_8bit import OptimState8bit

    model = _model()
    opt = _opt(model, 8)
    _train(model, opt, 3)
    sd = opt.state_dict()
    sd["adarank"] = {"format": 1, "version": "0.1.0"}
    want = {}
    for pid, st in sd["state"].items():
        p = [q for g in opt.param_groups for q in g["params"]][pid]
        r = int(st["rank"]) if "rank" in st else None
        shapes = (
            {"exp_avg": p.shape, "exp_avg_sq": p.shape}
            if r is None
            else {
                "exp_avg": quant.load(st["exp_avg"], _moment_shape(p, r)).shape,
                "exp_avg_sq": quant.load(st["exp_avg_sq"], _moment_shape(p, r)).shape,
            }
        )
        for key, shape in shapes.items():
            if st[key].dtype != torch.uint8:
                continue
            value = quant.load(st[key], shape)
            flat = value.reshape(-1)
            pad = -flat.numel() % 256
            flat = torch.cat([flat, flat.new_zeros(pad)])
            old = OptimState8bit.zeros(flat.shape, signed=key == "exp_avg", block_size=256)
            old.copy_(flat)
            st[key] = old
            want[(pid, key)] = value
    assert want
    fresh_model = _model()
    fresh = _opt(fresh_model, 8)
    fresh.load_state_dict(sd)
    for (pid, key), value in want.items():
        p = [q for g in fresh.param_groups for q in g["params"]][pid]
        got = quant.load(fresh.state[p][key], value.shape)
        assert fresh.state[p][key].dtype == torch.uint8
        assert float((got - value).norm() / value.norm()) < 0.05, key  # two 8-bit roundings
    assert fresh.state_dict()["adarank"]["format"] == FORMAT == 2
    _train(fresh_model, fresh, 2)


def _moment_shape(p, r):
    from lightning_adarank.optim.linalg import projected_shape

    return projected_shape(tuple(p.shape), r)
