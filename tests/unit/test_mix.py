"""Mixup / CutMix: a row's mix depends only on (seed, epoch, row) (so any split of the global
batch mixes alike), soft targets give the mixed loss, CutMix pastes exact boxes, alpha 0 is
bitwise the unmixed run, and misuse exits 2 naming the key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from procs import cli_here, weights

from dist_train.config.schema import AugmentConfig
from dist_train.data.loaders import TensorRows
from dist_train.data.mix import Mixer
from dist_train.data.sources import Table

N, K = 40, 5


def rows(shape=(2, 6, 7)) -> TensorRows:
    g = torch.Generator().manual_seed(0)
    return TensorRows(
        Table(torch.rand(N, *shape, generator=g), torch.randint(0, K, (N,), generator=g))
    )


def mix(cfg: AugmentConfig, idx: torch.Tensor, data: TensorRows, epoch=0, classes=K):
    return Mixer(cfg, 7, data, classes)(data.x[idx], data.y[idx], idx, epoch)


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(mixup=0.4),
        AugmentConfig(cutmix=1.0),
        AugmentConfig(mixup=0.4, cutmix=1.0, mix_prob=0.7, switch_prob=0.5),
    ],
)
def test_a_rows_mix_does_not_depend_on_the_batch_it_is_in(cfg):
    """One batch of 16, or 2 ranks x 8, or 4 micro-batches of 4: the same mixed rows."""
    data, idx = rows(), torch.randperm(N, generator=torch.Generator().manual_seed(1))[:16]
    whole_x, whole_y = mix(cfg, idx, data)
    parts = [mix(cfg, part, data) for part in idx.split(4)]
    assert torch.equal(whole_x, torch.cat([p[0] for p in parts]))
    assert torch.equal(whole_y, torch.cat([p[1] for p in parts]))
    assert not torch.equal(whole_x, data.x[idx])  # something was mixed
    other_epoch = mix(cfg, idx, data, epoch=1)[0]
    assert not torch.equal(whole_x, other_epoch)  # fresh draws each epoch
    assert torch.allclose(whole_y.sum(1), torch.ones(16))  # probabilities


def test_mixup_blends_inputs_and_targets_with_one_lambda_per_row():
    data, idx = rows(), torch.arange(N)
    mixer = Mixer(AugmentConfig(mixup=0.4), 7, data, K)
    x, y = mixer(data.x[idx], data.y[idx], idx, 0)
    t = mixer.tables(0, torch.device("cpu"))
    lam, p = t["lam"], t["partner"]
    assert sorted(p.tolist()) == list(range(N))  # every row is a partner exactly once
    expect = data.x * lam.view(-1, 1, 1, 1) + data.x[p] * (1 - lam.view(-1, 1, 1, 1))
    assert torch.equal(x, expect)
    onehot = F.one_hot(data.y, K).float()
    assert torch.allclose(y, lam[:, None] * onehot + (1 - lam[:, None]) * onehot[p])
    assert float(lam.std()) > 0.05  # per-row lambdas, not one per batch


def test_cutmix_pastes_a_box_and_targets_follow_its_area():
    data, idx = rows(), torch.arange(N)
    mixer = Mixer(AugmentConfig(cutmix=1.0), 7, data, K)
    x, y = mixer(data.x[idx], data.y[idx], idx, 0)
    t = mixer.tables(0, torch.device("cpu"))
    p = t["partner"]
    own = (x == data.x).all(1)  # [N, H, W]: the row's own pixels (all channels)
    pasted = (x == data.x[p]).all(1)
    assert bool((own | pasted).all())  # every pixel is exactly one image's
    for i in range(N):
        if p[i] == i:
            continue
        inside = ~own[i]
        area = int(inside.sum())
        rows_, cols = inside.any(1).nonzero(), inside.any(0).nonzero()
        if area:  # a rectangle
            assert area == len(rows_) * len(cols)
        share = 1 - area / (6 * 7)
        assert float(t["lam"][i]) == pytest.approx(share, abs=1e-6)
        assert float(y[i, data.y[i]]) >= share - 1e-6


def test_soft_targets_with_label_smoothing_equal_the_mixed_losses():
    """cross_entropy(out, lam*a + (1-lam)*b, ls) == lam*CE(out, a, ls) + (1-lam)*CE(out, b, ls)
    per row: mixing then smoothing is smoothing each label then mixing."""
    g = torch.Generator().manual_seed(2)
    out, a, b = torch.randn(8, K, generator=g), torch.randint(0, K, (8,), generator=g), None
    b = torch.randint(0, K, (8,), generator=g)
    lam = torch.rand(8, generator=g)
    soft = lam[:, None] * F.one_hot(a, K) + (1 - lam[:, None]) * F.one_hot(b, K)
    got = F.cross_entropy(out, soft, label_smoothing=0.1, reduction="none")
    ce = lambda t: F.cross_entropy(out, t, label_smoothing=0.1, reduction="none")  # noqa: E731
    assert torch.allclose(got, lam * ce(a) + (1 - lam) * ce(b), atol=1e-6)


def test_binary_targets_mix_as_numbers():
    g = torch.Generator().manual_seed(3)
    data = TensorRows(Table(torch.rand(N, 4, generator=g), torch.randint(0, 2, (N,), generator=g)))
    idx = torch.arange(N)
    mixer = Mixer(AugmentConfig(mixup=0.5), 7, data, 0)  # bce_with_logits: no one-hot
    _, y = mixer(data.x, data.y, idx, 0)
    t = mixer.tables(0, torch.device("cpu"))
    lam, p = t["lam"], t["partner"]
    assert y.shape == (N,) and y.dtype == torch.float32
    assert torch.allclose(y, lam * data.y + (1 - lam) * data.y[p].float())


DIGITS = (
    "recipes/digits_cnn.yaml",
    "train.max_steps=4",
    "train.batch_size=32",
    "checkpoint.every_epochs=0",
    "~data.augment",
    "~metrics",
)


def test_alpha_zero_is_bitwise_no_mixup(tmp_path):
    """`mixup: 0` and `cutmix: 0` train bitwise the run without them; alpha > 0 does not."""
    out = {}
    for name, extra in (
        ("plain", ()),
        ("zero", ("data.augment.mixup=0", "data.augment.cutmix=0")),
        ("mixed", ("data.augment.mixup=0.4",)),
    ):
        r = cli_here("train", *DIGITS, *extra, "-o", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = weights(tmp_path / name / "model.safetensors")
    assert all(torch.equal(out["plain"][k], out["zero"][k]) for k in out["plain"])
    assert not all(torch.equal(out["plain"][k], out["mixed"][k]) for k in out["plain"])


@pytest.mark.parametrize(
    "recipe, override, key",
    [
        ("recipes/wine_mlp.yaml", "data.augment.cutmix=1.0", "data.augment.cutmix"),
        ("recipes/diabetes_regression.yaml", "data.augment.mixup=0.2", "data.augment.mixup"),
    ],
)
def test_misuse_exits_2_naming_the_key(recipe, override, key):
    r = cli_here("check", recipe, override)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: {key}:") and "Traceback" not in r.stderr


def test_killed_mid_epoch_then_resumed_mixes_bitwise_the_same(tmp_path):
    """The draws are keyed on (seed, epoch, row), not on a random state: a run killed in the
    middle of its second epoch resumes to weights bitwise equal to an uninterrupted run."""
    from procs import cli_forked

    args = (
        "recipes/digits_cnn.yaml",
        "model.layers=[flatten, {linear: 32}, relu, {linear: out}]",
        "data.augment={mixup: 0.4, cutmix: 1.0, mix_prob: 0.8}",
        "train.epochs=2",  # 22 steps per epoch at batch 64
        "checkpoint.every_steps=10",
        "~metrics",
    )
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = cli_here("train", *args, "-o", str(ref))
    assert r.returncode == 0, r.stderr[-3000:]
    code = cli_forked(
        tmp_path / "killed.log", "train", *args, "-o", str(run), DIST_TRAIN_FAULT="before-write@40"
    )
    assert code < 0, (tmp_path / "killed.log").read_text()[-3000:]  # SIGKILLed at step 40
    r = cli_here("train", *args, "-o", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoints/step-000030" in r.stdout  # resumed mid-epoch 2 (steps 23..44)
    a, b = weights(ref / "model.safetensors"), weights(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Source:
    """A lazy row source whose row r is the constant r (so a fetched row names itself)."""

    input_shape, dtype = (3,), torch.float32

    def __len__(self) -> int:
        return N

    def fetch(self, ids):
        return torch.as_tensor(ids, dtype=torch.float32)[:, None].expand(-1, 3).clone()


def test_lazy_batches_bring_their_partners_from_the_workers_epoch_by_epoch():
    """Lazy rows fetch each row's mixing partner with the batch, in the DataLoader worker
    (persistent, 2 of them): every epoch's partners are that epoch's `partner_order`, read
    from the epoch the trainer sets before the iterator starts, and the mixer takes them
    (checking them) instead of fetching in the training process; the mix equals the one made
    from the same rows in memory."""
    import numpy as np

    from dist_train.config.schema import Recipe
    from dist_train.data.loaders import whole_batch
    from dist_train.data.mix import make_mixer, partner_order
    from dist_train.data.rows import LazyRows, LazyTable

    ids = np.arange(N, dtype=np.int32)[::-1].copy()  # split row i is source row N-1-i
    y = torch.arange(N) % K
    lazy = LazyRows(LazyTable(_Source(), ids, y))
    recipe = Recipe.model_validate(
        {
            "name": "m",
            "seed": 7,
            "data": {
                "source": "sklearn:iris",
                "target": "target",
                "task": "multiclass",
                "augment": {"mixup": 0.4},
            },
            "model": {"layers": [{"linear": "out"}]},
            "loss": "cross_entropy",
            "optimizer": {"name": "sgd", "lr": 0.1},
            "train": {"epochs": 3, "batch_size": 8},
        }
    )
    mixer = make_mixer(recipe, lazy, K)
    loader = torch.utils.data.DataLoader(
        lazy, batch_size=8, shuffle=True, collate_fn=whole_batch, num_workers=2,
        persistent_workers=True, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    memory = Mixer(recipe.data.augment, 7, TensorRows(Table(_Source().fetch(ids), y)), K)
    for epoch in range(3):
        mixer.start_epoch(epoch)
        for x, yb, idx, partner, xp, yp in loader:
            want = torch.from_numpy(partner_order(7, epoch, N))[idx]
            assert torch.equal(partner, want)
            assert torch.equal(xp[:, 0], torch.from_numpy(ids[want.numpy()]).float())
            assert torch.equal(yp, y[want])
            mixed = mixer(x, yb, idx, epoch, (partner, xp, yp))
            expected = memory(x, yb, idx, epoch)
            assert all(torch.equal(a, b) for a, b in zip(mixed, expected, strict=True))
    with pytest.raises(RuntimeError, match="another epoch than 1"):
        mixer(x, yb, idx, 1, (partner, xp, yp))  # the last batch's partners are epoch 2's
