"""Meta-device start-up (model/meta.py): each rank's shards, put together, are the plain
build's weights bit for bit; the model itself never holds real tensors before sharding."""

from __future__ import annotations

import torch

from dist_train.build import build_data, build_net, make_head
from dist_train.config.recipe import load_recipe
from dist_train.model import meta
from tests.procs import ROOT


def test_shards_of_the_meta_build_equal_the_plain_build_bitwise():
    # conv + batchnorm + dropout (the shape probe draws from the RNG) + an init scheme,
    # standardisation buffers; the widths do not divide by 3 (uneven, one empty shard).
    overrides = [
        "model.init={weight: kaiming_normal, bias: uniform}",
        "model.layers.8={linear: 5}",
        "train.strategy=fsdp",
    ]
    recipe = load_recipe(str(ROOT / "recipes/digits_cnn.yaml"), overrides)
    data = build_data(recipe)
    head = make_head(recipe, data)[0]
    plain = build_net(recipe, data, head).state_dict()
    world = 3
    stores = []
    for rank in range(world):
        net, store = meta.build_local_net(recipe, data, head, rank, world)
        assert all(t.is_meta for t in net.state_dict().values())
        assert store.keys() == plain.keys()
        stores.append(store)
    params = dict(build_net(recipe, data, head).named_parameters())
    assert params["layers.8.weight"].shape[0] == 5  # 2 + 2 + 1 rows: uneven shards
    for name, value in plain.items():
        if name in params:
            got = torch.cat([s[name] for s in stores])
        else:  # buffers are not sharded: every rank holds them in full
            got = stores[0][name]
            assert all(torch.equal(s[name], got) for s in stores)
        assert torch.equal(got, value), name
    assert meta.wanted(recipe, 2) and not meta.wanted(recipe, 1)
