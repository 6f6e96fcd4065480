"""AdaRankGrad from a real ``transformers.Trainer`` on MiniLM / SST-2: the Trainer's scheduler drives it, the
callback logs rank and memory through the Trainer's logs, and the layer-wise mode (with accumulation) gives
exactly the plain-PyTorch ``LayerwiseUpdater`` result."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from sst2_minilm import encode, load_classifier, minilm_path, needs_sst2, read_sst2

from lightning_adarank import AdaRankGrad, LayerwiseUpdater, param_groups

pytestmark = needs_sst2
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def data():
    from transformers import AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    enc = encode(tok, read_sst2("train", 48), max_length=24)
    rows = [{k: v[i] for k, v in enc.items()} for i in range(48)]
    return path, rows


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        logging_steps=2,
    )
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(transformers.TrainerCallback):
    """Stands for a reporting integration (TensorBoard, W&B): it logs what ``on_log`` hands it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.slow  # a few real Trainer steps of MiniLM
def test_trainer_schedules_adarankgrad_and_the_callback_logs_rank_and_memory(data, tmp_path):
    from transformers import Trainer

    from lightning_adarank import AdaRankGradTrainerCallback

    path, rows = data
    torch.manual_seed(0)
    model = load_classifier(path)
    opt = AdaRankGrad(param_groups(model, max_rank=4), lr=1e-4)
    recorder = Recorder()
    args = _args(tmp_path, max_steps=6, lr_scheduler_type="linear", warmup_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None), callbacks=[recorder])
    callback = AdaRankGradTrainerCallback().attach(trainer)
    trainer.train()

    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in train_logs] == [2, 4, 6]
    for log in train_logs:
        assert 1.0 <= log["adarank/avg_rank"] <= 4.0
        # may be negative at max_rank=4: the moment sketch (s × (max_rank + oversample)) is counted, GaLore has none
        assert log["adarank/state_reduction_vs_galore"] < 1.0
        assert log["optimizer/state_bytes"] > 0 and log["memory/peak_bytes"] > 0
    # the reporting integrations (after the callback, as attach() arranges) got the same figures
    seen = [log for log in recorder.logs if "loss" in log]
    assert [log["adarank/avg_rank"] for log in seen] == [log["adarank/avg_rank"] for log in train_logs]
    # the last figures against the optimizer's state, computed here
    last = train_logs[-1]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    ranks = opt.ranks()
    assert len(ranks) == 37  # every Linear except the 2x384 head
    numel = {n: shapes[n][0] * shapes[n][1] for n in ranks}
    assert last["adarank/avg_rank"] == pytest.approx(sum(ranks[n] * numel[n] for n in ranks) / sum(numel.values()))
    params = dict(model.named_parameters())
    ours = sum(
        opt.state[params[n]]["basis"].numel()
        + opt.state[params[n]]["exp_avg"].numel()
        + opt.state[params[n]]["exp_avg_sq"].numel()
        + opt.state[params[n]]["sketch"].numel()
        for n in ranks
    )
    galore = sum(4 * (min(shapes[n]) + 2 * max(shapes[n])) for n in ranks)
    assert last["adarank/state_reduction_vs_galore"] == pytest.approx(1 - ours / galore)
    state_bytes = sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)
    )
    assert last["optimizer/state_bytes"] == state_bytes
    assert callback.metrics()["optimizer/state_bytes"] == state_bytes
    # the Trainer's own linear schedule ran on AdaRankGrad: lr used at step 4 is 1e-4 * (6 - 3) / (6 - 2)
    assert train_logs[1]["learning_rate"] == pytest.approx(7.5e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def _sequential_run(path, rows, tmp_path, *, layerwise, accumulate, steps):
    from transformers import Trainer

    from lightning_adarank import AdaRankGradTrainerCallback

    torch.manual_seed(0)
    model = load_classifier(path, dropout=0.0)
    model.accepts_loss_kwargs = False  # the Trainer then divides each micro-batch's loss by the window size
    start = copy.deepcopy(model)
    opt = AdaRankGrad(param_groups(model, max_rank=4, min_gap=2, max_gap=3), lr=3e-4)
    args = _args(
        tmp_path,
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None))
    AdaRankGradTrainerCallback(layerwise=layerwise).attach(trainer)
    trainer.train()
    return start, model, opt


def _reference_layerwise(start, rows, accumulate, steps):
    """Plain PyTorch: the same micro-batches through ``LayerwiseUpdater.backward``."""
    model = copy.deepcopy(start)
    model.train()
    opt = AdaRankGrad(param_groups(model, max_rank=4, min_gap=2, max_gap=3), lr=3e-4)
    updater = LayerwiseUpdater(opt, accumulate_grad_batches=accumulate).attach()
    for i in range(steps * accumulate):
        batch = {k: torch.stack([r[k] for r in rows[4 * i : 4 * i + 4]]) for k in rows[0]}
        updater.backward(model(**batch).loss / accumulate)
    return model, opt


@pytest.mark.slow  # a few real Trainer steps of MiniLM
def test_layerwise_with_accumulation_matches_the_plain_pytorch_updater(data, tmp_path):
    path, rows = data
    start, model, opt = _sequential_run(path, rows[:32], tmp_path, layerwise=True, accumulate=2, steps=4)
    ref, ref_opt = _reference_layerwise(start, rows[:32], accumulate=2, steps=4)
    assert opt.ranks() == ref_opt.ranks()
    assert max(info.refreshes for info in opt.subspaces().values()) >= 2  # subspaces changed during the run
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=name)
    moved = sum(float((p - q).abs().max()) for p, q in zip(model.parameters(), start.parameters()))
    assert moved > 0


@pytest.mark.slow  # a few real Trainer steps of MiniLM
def test_layerwise_without_accumulation_matches_the_ordinary_step(data, tmp_path):
    path, rows = data
    _, lw, lw_opt = _sequential_run(path, rows[:24], tmp_path / "lw", layerwise=True, accumulate=1, steps=6)
    _, plain, plain_opt = _sequential_run(path, rows[:24], tmp_path / "plain", layerwise=False, accumulate=1, steps=6)
    assert lw_opt.ranks() == plain_opt.ranks()
    for (name, p), q in zip(lw.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=name)


def test_layerwise_refuses_gradient_clipping(data, tmp_path):
    from transformers import Trainer

    from lightning_adarank import AdaRankGradTrainerCallback

    path, rows = data
    model = load_classifier(path)
    opt = AdaRankGrad(param_groups(model, max_rank=4), lr=1e-4)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1, max_grad_norm=1.0),
        train_dataset=rows,
        optimizers=(opt, None),
        callbacks=[AdaRankGradTrainerCallback(layerwise=True)],
    )
    with pytest.raises(ValueError, match="max_grad_norm"):
        trainer.train()
