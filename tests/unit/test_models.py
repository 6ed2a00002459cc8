"""Layer list -> nn.Module: inferred sizes, init schemes, the import-path escape hatch, and the
summary table whose totals must equal sum(p.numel())."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dist_train.cli import main
from dist_train.config.layers import ModuleArgs
from dist_train.config.schema import FinetuneConfig, InitConfig, ModelConfig
from dist_train.errors import UserError
from dist_train.model.finetune import prepare_finetune
from dist_train.model.freeze import Freezing
from dist_train.model.net import build_model, format_summary, summary_rows

ROOT = Path(__file__).resolve().parents[2]


def net(layers: list, input_shape=(1, 8, 8), out=10, init: dict | None = None, norm=None):
    spec = ModelConfig.model_validate({"layers": layers, "init": init})
    torch.manual_seed(0)
    return build_model(spec.layers, None, spec.init, input_shape, out, norm)


CNN = [
    {"conv2d": {"out": 4, "kernel": 3, "padding": 1}},
    "batchnorm",
    "relu",
    {"max_pool2d": 2},
    "flatten",
    {"linear": 16},
    "batchnorm",
    "relu",
    {"linear": "out"},
]


def test_shape_inference_through_conv_pool_flatten_linear():
    model = net(CNN)
    layers = model.layers
    assert isinstance(layers[0], nn.Conv2d) and layers[0].in_channels == 1
    assert layers[5].in_features == 4 * 4 * 4  # 8x8 pooled to 4x4, 4 channels
    assert layers[8].out_features == 10  # `out` = number of classes
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    shapes = [row[2] for row in summary_rows(model, (1, 8, 8))]
    assert shapes == [
        "[4, 8, 8]",
        "[4, 8, 8]",
        "[4, 8, 8]",
        "[4, 4, 4]",
        "[64]",
        "[16]",
        "[16]",
        "[16]",
        "[10]",
    ]


def test_batchnorm_picks_1d_or_2d():
    model = net(CNN)
    assert type(model.layers[1]) is nn.BatchNorm2d and model.layers[1].num_features == 4
    assert type(model.layers[6]) is nn.BatchNorm1d and model.layers[6].num_features == 16


def test_conv_padding_same_and_stride():
    model = net(
        [
            {"conv2d": {"out": 2, "kernel": 3, "padding": "same"}},
            {"conv2d": {"out": 3, "kernel": 2, "stride": 2}},
            "flatten",
            {"linear": 5},
        ]
    )
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 5)
    assert model.layers[3].in_features == 3 * 4 * 4


def test_out_is_one_for_single_output_heads():
    model = net([{"linear": 4}, "relu", {"linear": "out"}], input_shape=(3,), out=1)
    assert model.layers[2].out_features == 1


def test_conv_on_flat_rows_needs_shape():
    with pytest.raises(UserError, match=r"model.layers\[0\] \(conv2d\).*data.shape"):
        net([{"conv2d": 4}], input_shape=(64,))


def test_batchnorm2d_on_flat_rows_is_refused():
    with pytest.raises(UserError, match=r"model.layers\[1\] \(batchnorm2d\).*batchnorm1d"):
        net([{"linear": 4}, "batchnorm2d"], input_shape=(3,))


def test_kernel_larger_than_image_names_the_layer():
    with pytest.raises(UserError, match=r"model.layers\[0\] \(conv2d\): cannot take an input"):
        net([{"conv2d": {"out": 2, "kernel": 9}}], input_shape=(1, 4, 4))


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_init_zeros_bias_and_constant_weight():
    model = net(
        [{"linear": 5}, "relu", {"linear": "out"}],
        input_shape=(3,),
        out=2,
        init={"weight": {"name": "constant", "val": 0.25}, "bias": "zeros"},
    )
    for lin in _linears(model):
        assert torch.all(lin.weight == 0.25)
        assert torch.all(lin.bias == 0)


def test_init_applies_to_conv_and_kaiming_differs_from_default():
    layers = [{"conv2d": 3}, "flatten", {"linear": "out"}]
    default = net(layers)
    kaiming = net(layers, init={"weight": {"name": "kaiming_normal", "nonlinearity": "relu"}})
    # same seed, different scheme: different weights; biases untouched by a weight-only init
    assert not torch.equal(default.layers[0].weight, kaiming.layers[0].weight)
    assert torch.equal(default.layers[0].bias, kaiming.layers[0].bias)
    # kaiming_normal(relu): std = sqrt(2 / fan_in); PyTorch's default is far smaller
    w = kaiming.layers[2].weight
    assert w.std().item() == pytest.approx((2 / w.shape[1]) ** 0.5, rel=0.15)
    assert default.layers[2].weight.std() < 0.7 * w.std()


def test_init_uniform_bounds_and_ones():
    model = net(
        [{"linear": 50}],
        input_shape=(40,),
        init={"weight": {"name": "uniform", "a": 0.5, "b": 0.75}, "bias": "ones"},
    )
    w = model.layers[0].weight
    assert w.min() >= 0.5 and w.max() <= 0.75
    assert torch.all(model.layers[0].bias == 1)


def test_init_default_keeps_pytorch_init():
    plain = net([{"linear": 4}], input_shape=(3,))
    same = net([{"linear": 4}], input_shape=(3,), init={"weight": "default", "bias": "default"})
    assert torch.equal(plain.layers[0].weight, same.layers[0].weight)


def test_init_without_bias_layer():
    model = net([{"linear": {"out": 4, "bias": False}}], input_shape=(3,), init={"bias": "ones"})
    assert model.layers[0].bias is None


@pytest.mark.parametrize(
    "scheme", [{"name": "zeros", "val": 1.0}, {"name": "xavier_uniform", "mode": "fan_in"}]
)
def test_init_invalid_kwargs_are_user_errors(scheme):
    with pytest.raises(UserError, match=f"model.init: `{scheme['name']}` does not take"):
        net([{"linear": 4}], input_shape=(3,), init={"weight": scheme})


def test_init_config_is_strict():
    with pytest.raises(ValueError, match="name"):
        InitConfig.model_validate({"weight": {"name": "he_normal"}})


def test_standardize_layer_stores_statistics():
    mean, std = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])
    model = net([{"linear": 1}], input_shape=(2,), norm=(mean, std))
    assert set(model.state_dict()) >= {"input_norm.mean", "input_norm.std"}
    x = torch.tensor([[3.0, 6.0]])
    torch.testing.assert_close(model.input_norm(x), torch.tensor([[1.0, 1.0]]))


USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        def __init__(self, input_shape, out_features, hidden=4):
            super().__init__()
            self.input_shape, self.hidden = input_shape, hidden
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape)
                                      .prod()), hidden), nn.ReLU(), nn.Linear(hidden, out_features))

        def forward(self, x):
            return self.body(x)

    class NoShapes(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.lin = nn.Linear(width, width)

    class NotAModule:
        pass
""")


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    (tmp_path / "my_models_for_test.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_models_for_test"


def _module(path: str, **kwargs):
    return build_model(None, ModuleArgs(path=path, kwargs=kwargs), None, (2, 3), 5)


def test_user_module_gets_shapes_filled_in(user_pkg):
    model = _module(f"{user_pkg}:TinyNet", hidden=7)
    assert model.layers.input_shape == (2, 3) and model.layers.hidden == 7
    assert model(torch.zeros(4, 2, 3)).shape == (4, 5)


def test_user_module_as_a_layer(user_pkg):
    model = net(
        [{"linear": 6}, {"module": {"path": f"{user_pkg}:TinyNet"}}], input_shape=(3,), out=2
    )
    assert model.layers[1].input_shape == (6,)
    assert model(torch.zeros(1, 3)).shape == (1, 2)


def test_user_module_without_shape_args(user_pkg):
    model = _module(f"{user_pkg}:NoShapes", width=3)
    assert model.layers.lin.in_features == 3


@pytest.mark.parametrize("kwargs", [{"hiden": 3}, {}])
def test_user_module_bad_kwargs(user_pkg, kwargs):
    path = f"{user_pkg}:TinyNet" if kwargs else f"{user_pkg}:NoShapes"
    with pytest.raises(UserError, match=r"kwargs: .*arguments: \[") as err:
        _module(path, **kwargs)
    assert path in str(err.value)


def test_user_module_not_a_module_class(user_pkg):
    with pytest.raises(UserError, match=r"not an nn\.Module subclass"):
        _module(f"{user_pkg}:NotAModule")


@pytest.mark.parametrize(
    "path", ["../evil.py:X", "/abs/evil.py:X", "os.system", "a.b:c d", "pkg/mod:X"]
)
def test_user_module_rejects_non_import_paths(path):
    with pytest.raises(UserError, match="file paths are not accepted"):
        _module(path)


def test_user_module_missing_attribute(user_pkg):
    with pytest.raises(UserError, match="cannot import"):
        _module(f"{user_pkg}:Nope")


def _totals(text: str) -> tuple[int, int, int]:
    m = re.search(r"parameters: ([\d,]+) total, ([\d,]+) trainable, ([\d,]+) frozen", text)
    assert m, text
    return tuple(int(g.replace(",", "")) for g in m.groups())


def test_format_summary_totals_equal_numel():
    model = net(CNN, norm=(torch.zeros(1, 1, 1), torch.ones(1, 1, 1)))
    text = format_summary(model, (1, 8, 8))
    total = sum(p.numel() for p in model.parameters())
    assert _totals(text) == (total, total, 0)
    rows = summary_rows(model, (1, 8, 8))
    assert sum(r[3] + r[4] for r in rows) == total
    assert "frozen:" not in text


def test_summary_counts_frozen_after_finetune_freeze(tmp_path):
    model = net(CNN)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    fresh = net(CNN)
    cfg = FinetuneConfig.model_validate(
        {"from": str(tmp_path / "model.safetensors"), "freeze": ["layers.0.*", "layers.1.*"]}
    )
    report = prepare_finetune(fresh, cfg)
    recipe = SimpleNamespace(freeze=None, finetune=cfg, unfreeze=None)  # the deprecated alias
    freezing = Freezing(recipe, fresh)
    freezing.apply(fresh, 0)
    notes = freezing.describe(fresh)
    frozen = sum(
        p.numel() for n, p in fresh.named_parameters() if n.startswith(("layers.0.", "layers.1."))
    )
    total = sum(p.numel() for p in fresh.parameters())
    text = format_summary(fresh, (1, 8, 8))
    assert _totals(text) == (total, total - frozen, frozen)
    assert "frozen: layers.0.weight, layers.0.bias, layers.1.weight, layers.1.bias" in text
    assert f"{frozen} parameters frozen at epoch 0" in notes[0]
    assert len(report.loaded) == len(fresh.state_dict())
    rows = {r[0]: r for r in summary_rows(fresh, (1, 8, 8))}
    assert rows["layers.0"][3:] == (0, 4 * 9 + 4) and rows["layers.5"][4] == 0


def test_summary_cli_for_wine_recipe(capsys):
    assert main(["summary", str(ROOT / "recipes" / "wine_mlp.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "wine-mlp"
    # 13 features -> 64 -> 32 -> 3 classes
    total = (13 * 64 + 64) + (64 * 32 + 32) + (32 * 3 + 3)
    assert _totals(out) == (total, total, 0)
    assert "input [13]" in out
    for name, kind, shape in [
        ("layers.0", "Linear", "[64]"),
        ("layers.4", "LeakyReLU", "[32]"),
        ("layers.5", "Linear", "[3]"),
    ]:
        assert re.search(rf"^{re.escape(name)}\s+{kind}\s+{re.escape(shape)}\s", out, re.M), out
