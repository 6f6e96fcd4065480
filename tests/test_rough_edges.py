"""Issue 30's rough edges: what "all-linear" selects (checked against PEFT's own "all-linear" on real transformers
models, tied and untied), conv layers (a clear message, a warning for 4-D weights in a low_rank group), errors
that name the callback/strategy the user built, and the info line for an optimizer left as returned."""

from __future__ import annotations

import copy
import logging
import warnings

import lightning as L
import pytest
import torch
from scripts.tiny import ADARANK, TinyModule, loader, make_data, trainer_kwargs
from torch import nn

from lightning_adarank import (
    AdaRankGrad,
    AdaRankGradCallback,
    AdaRankGradStrategy,
    param_groups,
    target_parameter_names,
)

transformers = pytest.importorskip("transformers")


def _llama(tie: bool):
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )


def _bert_mlm():
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )


MODELS = {
    "llama_untied": lambda: _llama(False),
    "llama_tied": lambda: _llama(True),
    "gpt2": _gpt2,
    "bert_mlm": _bert_mlm,
}


def _peft_all_linear(model) -> set[str]:
    """The weights PEFT's ``target_modules="all-linear"`` puts LoRA on (computed by PEFT itself)."""
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules="all-linear"))
    inner = wrapped.base_model.model
    return {f"{name}.weight" for name, m in inner.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("name", list(MODELS))
def test_all_linear_is_pefts_all_linear(name):
    model = MODELS[name]()
    ours = set(target_parameter_names(model))
    assert ours == _peft_all_linear(model)
    head = model.get_output_embeddings().weight
    assert all(p is not head for n, p in model.named_parameters() if n in ours)  # the output layer is left out


@pytest.mark.parametrize("tie", [False, True])
def test_tied_and_untied_heads_follow_include_embeddings_alike(tie):
    model = _llama(tie)
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    for include in (False, True):
        chosen = {
            id(p) for n, p in model.named_parameters() if n in target_parameter_names(model, include_embeddings=include)
        }
        assert (id(head) in chosen) is include and (id(emb) in chosen) is include


def test_include_embeddings_projects_every_embedding_table():
    """BERT: word, position and token-type embeddings (the docstring says all three), and the tied MLM head."""
    model = _bert_mlm()
    extra = set(target_parameter_names(model, include_embeddings=True)) - set(target_parameter_names(model))
    assert extra == {
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
    }


class HandGPT(nn.Module):
    """No Hugging Face ``get_output_embeddings``: an untied head shaped like the vocabulary embedding, after a
    projection that happens to share its shape."""

    def __init__(self, vocab=32, hidden=32):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, vocab)  # same shape as the head, not the output layer
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, x):
        return self.lm_head(self.proj(self.wte(x)))


def test_hand_written_head_is_the_last_vocabulary_shaped_linear():
    model = HandGPT()
    assert target_parameter_names(model) == ["proj.weight"]
    assert target_parameter_names(model, include_embeddings=True) == ["wte.weight", "proj.weight", "lm_head.weight"]
    assert target_parameter_names(model, ["lm_head"]) == ["lm_head.weight"]  # named explicitly: selected


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.conv2 = nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


def test_conv_target_modules_get_a_clear_message():
    with pytest.raises(ValueError, match=r"conv1 \(Conv2d\), conv2 \(Conv2d\), but only nn\.Linear .*are projected"):
        param_groups(SmallCNN(), ["conv1", "conv2"])


def test_a_4d_weight_in_a_low_rank_group_warns():
    net = SmallCNN()
    with pytest.warns(UserWarning, match=r"get dense AdamW.*conv1\.weight \(16, 3, 3, 3\)"):
        AdaRankGrad(net.named_parameters(), max_rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaRankGrad(param_groups(net, max_rank=4))  # the convs go to the dense group: nothing to say


class CNNModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = SmallCNN()

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _cnn_data():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8)), batch_size=4)


@pytest.mark.parametrize("door", ["callback", "strategy"])
def test_fit_errors_name_what_the_user_built(door):
    owner = "AdaRankGradCallback" if door == "callback" else "AdaRankGradStrategy"
    door_kw = (
        {"callbacks": [AdaRankGradCallback(target_modules=["conv1"])]}
        if door == "callback"
        else {"strategy": AdaRankGradStrategy(target_modules=["conv1"])}
    )
    with pytest.raises(ValueError, match=rf"^{owner}: target_modules=\['conv1'\] selects no weight.*conv1 \(Conv2d\)"):
        L.Trainer(max_steps=1, **trainer_kwargs(**door_kw)).fit(CNNModule(), _cnn_data())


class TensorLr(TinyModule):
    def __init__(self, lr):
        super().__init__()
        self.lr = lr

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def test_a_module_setting_that_does_not_carry_over_names_the_callback():
    # torch's AdamW takes any 1-element tensor lr; AdaRankGrad takes a 0-d one only
    with pytest.raises(
        TypeError,
        match=r"^AdaRankGradCallback: the settings of the module's AdamW do not carry over"
        r" to AdaRankGrad: a tensor lr must be a 0-d float tensor, got shape \(1,\)",
    ):
        L.Trainer(max_steps=1, callbacks=[AdaRankGradCallback()], **trainer_kwargs()).fit(
            TensorLr(torch.tensor([1e-2])), loader(make_data(), 16)
        )


def test_a_0d_tensor_lr_carries_over_and_trains():
    module = TensorLr(torch.tensor(1e-2))
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(max_steps=2, callbacks=[AdaRankGradCallback()], **trainer_kwargs())
    trainer.fit(module, loader(make_data(), 16))
    (optimizer,) = trainer.optimizers
    assert type(optimizer).__name__ == "AdaRankGrad"
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, module.parameters()))


def test_resume_with_another_max_rank_names_the_callback_setting(tmp_path):
    trainer = L.Trainer(max_steps=4, callbacks=[AdaRankGradCallback(**ADARANK)], **trainer_kwargs())
    trainer.fit(TinyModule(), loader(make_data(), 16))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = L.Trainer(max_steps=6, callbacks=[AdaRankGradCallback(**{**ADARANK, "max_rank": 4})], **trainer_kwargs())
    with pytest.raises(ValueError) as err:
        other.fit(TinyModule(), loader(make_data(), 16), ckpt_path=tmp_path / "a.ckpt")
    message = str(err.value)
    assert message.startswith("AdaRankGradCallback: the checkpoint's optimizer state does not fit")
    assert "resume with AdaRankGradCallback(max_rank=6)" in message
    assert "build the optimizer" not in message and "AdaRankGrad state" not in message


class TwoOptimizers(TinyModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.extra = nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.extra(self.net(x)), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return [AdaRankGrad(param_groups(self.net), lr=1e-2, **ADARANK), torch.optim.AdamW(self.extra.parameters())]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_an_optimizer_left_as_returned_is_named_once():
    records = _Records()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(records)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        trainer = L.Trainer(max_steps=3, callbacks=[AdaRankGradCallback()], **trainer_kwargs())
        trainer.fit(TwoOptimizers(), loader(make_data(), 16))
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)
    said = [m for m in records.messages if "left as returned" in m]
    assert len(said) == 1 and "AdamW (the optimizer(s) at position 1)" in said[0]
    assert said[0].startswith("AdaRankGradCallback:")
    assert type(trainer.optimizers[1]) is torch.optim.AdamW
