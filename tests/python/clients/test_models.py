"""natgrad.KFAC on tiny, randomly initialised models of transformers (GPT-2, Llama, BERT) and timm
(resnet18, ViT): every parameter gets curvature, the plan describe() shows before the first step
is what the steps then use, and a few steps keep the loss finite.

What K-FAC leaves on the plain gradient on purpose is the opt-out alone: the parameters of modules
named in ``skip_modules`` (checked here with one skipped module per model).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

PLANNED = re.compile(r" \(planned: from the first training-mode step[^)]*\)")


def gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config), "transformer.h.0.mlp.c_fc"


def llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config), "model.layers.0.mlp.up_proj"


def bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=4, pad_token_id=0)
    return transformers.BertForSequenceClassification(config), "bert.pooler.dense"


def resnet18():
    return timm.create_model("resnet18", num_classes=4), "layer1.0.conv1"


def vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=4, embed_dim=16,
                             depth=2, num_heads=2), "blocks.0.mlp.fc1"


def loss_of(name, model, g):
    if name in ("resnet18", "vit"):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)
        return F.cross_entropy(model(x), y)
    tokens = torch.randint(1, 64, (4, 12), generator=g)
    if name == "bert":
        return model(input_ids=tokens, labels=torch.randint(0, 4, (4,), generator=g)).loss
    return model(input_ids=tokens, labels=tokens).loss


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert, "resnet18": resnet18, "vit": vit}


def treatments(opt):
    """Parameter name -> describe()'s preconditioner column."""
    rows = [re.split(r"\s{2,}", line, maxsplit=2) for line in opt.describe().splitlines()[1:]]
    return {name: text for name, _, text in rows}


def owned_by(model, module_name):
    module = model.get_submodule(module_name)
    return {n for n, p in model.named_parameters() if any(p is q for q in module.parameters())}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_parameter_gets_the_curvature_its_plan_shows(name):
    torch.manual_seed(0)
    model, skipped = MODELS[name]()
    model.train()
    opt = natgrad.KFAC(model, lr=1e-3, damping=1e-2, skip_modules=[skipped])
    planned = treatments(opt)
    assert set(planned) == {n for n, _ in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = loss_of(name, model, g)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    after = treatments(opt)
    plain = {n for n, text in after.items() if text.startswith("plain gradient")}
    assert plain == owned_by(model, skipped), "only the skipped module's parameters are on the plain gradient"
    assert all("K-FAC" in text or "diagonal Fisher" in text for n, text in after.items() if n not in plain)
    # the plan shown before the first step is what the steps used
    assert {n: PLANNED.sub("", t) for n, t in planned.items()} == after
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gpt2_conv1d_is_registered_on_first_sight_and_steps_as_a_transposed_linear():
    """The real transformers class, met by natgrad without any registration call (the kind itself
    is tested in depth on a copy of the class in tests/python/curvature/test_layers_registry.py).
    """
    from transformers.pytorch_utils import Conv1D

    from natgrad.integrations.transformers import Conv1DKind

    assert isinstance(natgrad.curvature.kind_of(Conv1D(3, 2)), Conv1DKind)

    class Net(nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.a = Conv1D(8, 5) if conv else nn.Linear(5, 8)
            self.b = Conv1D(3, 8) if conv else nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    conv, linear = Net(True).double(), Net(False).double()
    with torch.no_grad():
        for name in ("a", "b"):
            getattr(linear, name).weight.copy_(getattr(conv, name).weight.T)
            getattr(linear, name).bias.copy_(getattr(conv, name).bias)
    x, y = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6, 4))
    opts = [natgrad.KFAC(m, lr=0.1, damping=1e-2, inverse_update_period=1) for m in (conv, linear)]
    assert "K-FAC linear, transposed weight" in opts[0].describe()
    for _ in range(3):
        for model, opt in zip((conv, linear), opts):
            opt.zero_grad()
            F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
            opt.step()
    for name in ("a", "b"):
        torch.testing.assert_close(getattr(conv, name).weight, getattr(linear, name).weight.T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(getattr(conv, name).bias, getattr(linear, name).bias, rtol=1e-10, atol=1e-12)
