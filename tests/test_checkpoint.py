"""Checkpoint hygiene: a saved AdaRankGrad state is checked against the parameters it is loaded into, carries a
format tag, loads with ``weights_only=True``; truncated or corrupted files give a clear error."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lightning_adarank import AdaRankGrad, param_groups
from lightning_adarank.optim.checkpoint import FORMAT, CheckpointFileError, verify_checkpoint_file

KW = dict(lr=1e-2, max_rank=4, min_gap=1, max_gap=2)


def _net(hidden=24, out=40, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, hidden), nn.Tanh(), nn.Linear(hidden, out))


def _train(net, opt, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()


def _trained(net=None, **kw):
    net = net or _net()
    opt = AdaRankGrad(param_groups(net), **{**KW, **kw})
    _train(net, opt)
    return net, opt


def test_state_carries_format_tag_and_loads_weights_only():
    net, opt = _trained()
    sd = opt.state_dict()
    assert sd["adarank"]["format"] == FORMAT and isinstance(sd["adarank"]["version"], str)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=True)
    opt2 = AdaRankGrad(param_groups(_net()), **KW)
    opt2.load_state_dict(again)
    assert opt2.ranks() == opt.ranks()


def test_another_models_state_names_the_first_mismatching_parameter():
    _, opt = _trained(_net(hidden=24))
    other = AdaRankGrad(param_groups(_net(hidden=20)), **KW)  # same structure, other widths
    with pytest.raises(ValueError, match=r"'0\.weight'.*\(20, 16\)"):
        other.load_state_dict(opt.state_dict())
    # the probe: before the check this loaded and the first step failed inside linalg
    assert not other.state


def test_plain_adamw_state_is_refused_with_a_clear_message():
    net = _net()
    adamw = torch.optim.AdamW(net.parameters())
    _train(net, adamw)
    ours = AdaRankGrad(net.parameters(), **KW)
    with pytest.raises(ValueError, match="full-size moments and no basis"):
        ours.load_state_dict(adamw.state_dict())


def test_different_max_rank_is_refused_naming_the_setting():
    _, opt = _trained()
    with pytest.raises(ValueError, match="max_rank=4.*max_rank=6"):
        AdaRankGrad(param_groups(_net()), **{**KW, "max_rank": 6}).load_state_dict(opt.state_dict())


def test_group_count_and_size_mismatch():
    net, opt = _trained()
    sd = opt.state_dict()
    one_group = AdaRankGrad(list(_net().parameters()), **KW)
    with pytest.raises(ValueError, match="parameter group"):
        one_group.load_state_dict(sd)
    fewer = _net()
    groups = param_groups(fewer)
    groups[-1] = {**groups[-1], "params": groups[-1]["params"][:1]}
    groups[-1].pop("param_names", None)
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    with pytest.raises(ValueError, match="group 1 has"):
        AdaRankGrad(groups, **KW).load_state_dict(sd)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
def test_corrupted_projected_layout_is_named(shape):
    w = nn.Parameter(torch.randn(shape))
    opt = AdaRankGrad([("w", w)], **KW)
    w.grad = torch.randn(shape)
    opt.step()
    sd = opt.state_dict()
    st = sd["state"][0]
    r = st["basis"].shape[1]
    bad = {**sd, "state": {0: {**st, "exp_avg": st["exp_avg"].mT.contiguous()}}}
    with pytest.raises(ValueError, match=rf"'w'.*rank-{r} basis needs exp_avg"):
        AdaRankGrad([("w", nn.Parameter(torch.randn(shape)))], **KW).load_state_dict(bad)
    wide = {**sd, "state": {0: {**st, "basis": torch.zeros(min(shape), 5)}}}
    with pytest.raises(ValueError, match="rank-5 basis, outside"):
        AdaRankGrad([("w", nn.Parameter(torch.randn(shape)))], **KW).load_state_dict(wide)


def test_newer_format_is_refused_and_untagged_state_migrates():
    net, opt = _trained()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="format 99.*Upgrade"):
        AdaRankGrad(param_groups(_net()), **KW).load_state_dict({**sd, "adarank": {"format": 99, "version": "9.0"}})
    with pytest.raises(ValueError, match="malformed"):
        AdaRankGrad(param_groups(_net()), **KW).load_state_dict({**sd, "adarank": "v1"})
    # format 0 (untagged, lightning-adarank 0.1.0 before the tag): same layout, loads and resumes exactly
    legacy = {k: v for k, v in sd.items() if k != "adarank"}
    a_net, b_net = _net(), _net()
    a_net.load_state_dict(net.state_dict())
    b_net.load_state_dict(net.state_dict())
    a = AdaRankGrad(param_groups(a_net), **KW)
    a.load_state_dict(legacy)
    b = AdaRankGrad(param_groups(b_net), **KW)
    b.load_state_dict(sd)
    _train(a_net, a, seed=5)
    _train(b_net, b, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a_net.parameters(), b_net.parameters()))


def _saved(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.randn(300, 100), "step": 3}, path)
    return path


def test_truncated_and_bit_flipped_files_are_named(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    verify_checkpoint_file(path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFileError, match="cut.pt.*truncated"):
        verify_checkpoint_file(cut)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside the tensor's bytes: torch.load alone accepts this silently
    bad = tmp_path / "flip.pt"
    bad.write_bytes(bytes(flipped))
    assert not torch.equal(torch.load(bad, weights_only=True)["w"], torch.load(path, weights_only=True)["w"])
    with pytest.raises(CheckpointFileError, match="flip.pt.*CRC-32"):
        verify_checkpoint_file(bad)


# ------------------------------------------------------------------ through Lightning and Fabric
def _lightning_fit(tmp_path, steps, ckpt_path=None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from scripts.tiny import ADARANK, TinyModule, loader, make_data, trainer_kwargs

    from lightning_adarank import AdaRankGradStrategy, EffectiveRankMonitor, MemoryMonitor

    trainer = L.Trainer(
        **trainer_kwargs(
            max_steps=steps,
            strategy=AdaRankGradStrategy(**ADARANK),
            enable_checkpointing=True,
            logger=CSVLogger(tmp_path),
            callbacks=[
                EffectiveRankMonitor(),
                MemoryMonitor(),
                ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True),
            ],
        )
    )
    trainer.fit(TinyModule(), loader(make_data(), 16), ckpt_path=ckpt_path)
    return trainer


def _middle_of_largest_entry(data: bytes) -> int:
    """Offset of the middle byte of the largest entry's stored data in a zip archive (``torch.save``'s format)."""
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = max(zf.infolist(), key=lambda i: i.compress_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len + info.compress_size // 2


def test_lightning_checkpoint_is_weights_only_and_a_damaged_one_is_named(tmp_path):
    _lightning_fit(tmp_path, 4)
    last = tmp_path / "ck" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # everything the package writes: optimizer state, monitors' state
    assert ckpt["optimizer_states"][0]["adarank"]["format"] == FORMAT
    assert not list((tmp_path / "ck").glob(".*.tmp"))  # atomic save left no temporary file
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointFileError, match="last.ckpt.*truncated"):
        _lightning_fit(tmp_path, 6, ckpt_path=str(last))
    flipped = bytearray(data)
    flipped[_middle_of_largest_entry(data)] ^= 0x55  # a byte of stored data (not the zip's alignment padding)
    last.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointFileError, match="last.ckpt"):
        _lightning_fit(tmp_path, 6, ckpt_path=str(last))


def test_fabric_save_is_weights_only_and_verified_load_names_damage(tmp_path):
    from lightning.fabric import Fabric

    from lightning_adarank import FabricRankMonitor, VerifiedCheckpointIO

    fabric = Fabric(accelerator="cpu", devices=1, plugins=[VerifiedCheckpointIO()])
    net = _net()
    opt = AdaRankGrad(param_groups(net), **KW)
    monitor = FabricRankMonitor()
    model, opt = fabric.setup(net, opt)
    _train(model, opt)
    monitor.update(opt)
    path = tmp_path / "f.ckpt"
    fabric.save(path, {"model": model, "optimizer": opt, "monitor": monitor})
    raw = torch.load(path, weights_only=True)
    assert raw["optimizer"]["adarank"]["format"] == FORMAT
    state = {"model": model, "optimizer": opt, "monitor": FabricRankMonitor()}
    fabric.load(path, state)
    assert state["monitor"].step == 1
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(CheckpointFileError, match="f.ckpt"):
        fabric.load(path, state)
