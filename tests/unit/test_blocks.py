"""Activation checkpointing over the model's blocks (train.activation_checkpointing): the same
weights as without it, less activation memory, and blocks found in every kind of model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dist_train.config.recipe import load_recipe
from dist_train.errors import UserError
from dist_train.model.blocks import apply_activation_checkpointing, module_blocks
from dist_train.model.net import Net
from dist_train.training.trainer import train

ROOT_RECIPE = "recipes/digits_cnn.yaml"  # conv, batchnorm, relu, pooling, dropout, linear


def test_checkpointed_cnn_trains_to_the_same_weights_bitwise(tmp_path):
    """Dropout masks are replayed and batchnorm statistics are not updated twice by the
    recompute: weights and buffers after a few steps equal the plain run's, bit for bit."""
    from tests.procs import ROOT

    common = ["train.max_steps=6", "train.epochs=1", "tracking.wandb.mode=disabled"]
    out = {}
    for ac in ("false", "true"):
        recipe = load_recipe(
            str(ROOT / ROOT_RECIPE), [*common, f"train.activation_checkpointing={ac}"]
        )
        train(recipe, str(tmp_path / ac))
        out[ac] = load_file(tmp_path / ac / "model.safetensors")
    assert out["true"].keys() == out["false"].keys()
    assert any("running_mean" in k for k in out["true"])
    for key, value in out["false"].items():
        assert torch.equal(out["true"][key], value), key


def _deep_mlp() -> Net:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(128, 128), nn.BatchNorm1d(128), nn.GELU(), nn.Dropout(0.1)]
    return Net(nn.Sequential(*layers, nn.Linear(128, 3)))


def _activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward: every saved tensor's storage once, parameters
    excluded (they are weights, not activations). Checkpointed blocks save their inputs
    through the same hooks, so they are counted too."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(1)  # the same dropout masks for both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    loss.backward()
    return sum(seen.values())


def test_checkpointing_cuts_the_activation_memory_of_a_deep_mlp():
    plain, checkpointed = _deep_mlp(), _deep_mlp()
    blocks = apply_activation_checkpointing(checkpointed, [])
    assert blocks == 9  # 8 x (linear, batchnorm1d, gelu, dropout) + the output layer
    x = torch.randn(256, 128)
    kept, kept_ac = _activation_bytes(plain, x), _activation_bytes(checkpointed, x)
    # Without: each block keeps its input, the norm's input, GELU's input and the dropout
    # mask; with: the block inputs only.
    assert kept_ac < 0.4 * kept, (kept, kept_ac)
    print(f"activation bytes: {kept} plain, {kept_ac} checkpointed")
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Layer(), Layer()])
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        for block in self.layer:
            x = block(x)
        return self.out(x)


def test_blocks_of_a_module_model_by_layer_list_or_class_name():
    model = Net(Encoder())
    assert module_blocks(model, []) == list(model.layers.layer)
    assert module_blocks(model, ["Linear"]) == [m.fc for m in model.layers.layer] + [
        model.layers.out
    ]
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(3, 4, requires_grad=True)
    ref = torch.autograd.grad(model(x).sum(), x)[0]
    assert apply_activation_checkpointing(model, []) == 2
    assert [n for n, _ in model.named_parameters()] == names  # no renamed parameter
    assert torch.equal(torch.autograd.grad(model(x).sum(), x)[0], ref)
    with pytest.raises(UserError, match=r"train\.fsdp\.wrap"):
        apply_activation_checkpointing(Net(nn.Sequential(nn.Linear(2, 2))), ["NoSuchClass"])
