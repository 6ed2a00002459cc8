"""Hot-path pieces: the direct batch iteration equals accelerate's, the fast grad norm equals
torch's, `train.compile` keeps clean parameter names, and the CPU process-count warning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_train.data.loaders import fast_batches, make_loader
from dist_train.data.sources import Table
from dist_train.training.distributed import place_model
from dist_train.training.step import total_norm


def _accelerator():
    from accelerate import Accelerator, DataLoaderConfiguration

    return Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=3)
    )


@pytest.mark.parametrize("shuffle", [True, False])
def test_fast_batches_match_the_prepared_loader(shuffle):
    """Same rows, same order, same batches as iterating accelerate's loader (the index tensors
    are slices of the seedable sampler's own permutation), for every epoch and resume skip."""
    acc = _accelerator()
    table = Table(torch.randn(103, 4), torch.randint(0, 3, (103,)))
    loader = acc.prepare(make_loader(table, 8, shuffle, shuffle, seed=3))
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)
        slow = list(loader)
        for skip in (0, 5):
            loader.set_epoch(epoch)
            fast = list(fast_batches(loader, skip))
            assert len(fast) == len(slow) - skip == (12 if shuffle else 13) - skip
            for a, b in zip(slow[skip:], fast, strict=True):
                assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
        if shuffle:  # the sampler's own epoch moves on once exhausted, as when iterated
            assert loader.batch_sampler.sampler.epoch == epoch + 1
    assert fast_batches(acc.prepare(torch.utils.data.DataLoader(range(10))), 0) is None


def test_total_norm_equals_torch():
    grads = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2)]
    assert torch.equal(total_norm(grads), torch.nn.utils.get_total_norm(grads))
    grads[1][0] = float("nan")
    assert not torch.isfinite(total_norm(grads))


def test_fused_finite_check_finds_inf_and_nan_and_leaves_gradients_alone():
    from dist_train.training.step import FiniteCheck

    check = FiniteCheck()

    def _all_finite(params):
        return check([p.grad for p in params if p.grad is not None])

    params = [
        nn.Parameter(torch.zeros(4, 3)),
        nn.Parameter(torch.zeros(5)),
        nn.Parameter(torch.zeros(2)),
    ]
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params[:2]]
    assert _all_finite(params)  # params[2] has no gradient (frozen / unused): skipped
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=False))
    for bad in (float("inf"), float("-inf"), float("nan")):
        params[1].grad[3] = bad
        assert not _all_finite(params)
        params[1].grad[3] = 0.0
        assert _all_finite(params)


def test_compile_keeps_state_dict_names():
    import shutil

    import pytest
    from torch._dynamo import is_dynamo_supported
    from torch._inductor import config

    # Skip only on the two known unsupported set-ups; any other compile failure is a failure.
    if not is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) does not support this Python version/platform")
    cxx = [c for c in config.cpp.cxx if c]
    if not any(shutil.which(c) for c in cxx):
        pytest.skip(f"no C++ compiler ({' or '.join(cxx)}): inductor cannot build CPU kernels")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    eager = model(x)
    names = list(model.state_dict())
    compiled = place_model(model, torch.device("cpu"), compile=True)
    out = compiled(x)
    assert torch.allclose(out, eager, atol=1e-6)
    assert list(compiled.state_dict()) == names  # no `_orig_mod.` prefix
    assert not any("_orig_mod" in n for n, _ in compiled.named_parameters())


def test_more_cpu_processes_than_cores_warns_once(monkeypatch):
    import pytest

    from dist_train.training.distributed import _cpu_processes

    class Acc:
        num_processes, is_main_process = 1, True

    before = torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "512")
    try:
        with pytest.warns(UserWarning, match="512 processes on"):
            _cpu_processes(Acc(), threads=None)
        assert torch.get_num_threads() == 1  # each rank gets its share of the cores
    finally:
        torch.set_num_threads(before)


def test_chunked_evaluation_equals_a_direct_computation():
    """Metrics updated once per chunk of gathered rows (not per batch) give the exact values of
    one pass over all rows; the in-memory loader is sliced directly."""
    from dist_train.model.head import Head
    from dist_train.training.evaluate import evaluate
    from dist_train.training.metrics import MetricSet

    acc = _accelerator()
    torch.manual_seed(0)
    table = Table(torch.randn(103, 4), torch.randint(0, 3, (103,)))
    net = acc.prepare(nn.Linear(4, 3))
    loader = acc.prepare(make_loader(table, 8, False, False))
    assert fast_batches(loader) is not None
    head = Head("multiclass", "cross_entropy")
    names = ["accuracy", "f1", "confusion_matrix", "auroc"]
    results = [
        evaluate(net, loader, head, MetricSet(names, "multiclass", 3, acc.device), acc, chunk)
        for chunk in (1, 20, 10_000)
    ]
    with torch.no_grad():
        out = net(table.x)
    direct = torch.nn.functional.cross_entropy(out, table.y, reduction="none").double().mean()
    for r in results:
        assert r["valid/rows"] == 103
        # float32 outputs of a batch-of-103 forward vs the loader's batches differ in the last
        # bits on some CPUs (matmul blocking): a float32-level bound, not float64's.
        assert abs(r["valid/loss"] - float(direct)) < 1e-6
        assert r["valid/accuracy"] == float((out.argmax(1) == table.y).float().mean())
        assert sum(map(sum, r["valid/confusion_matrix"])) == 103
        assert r == results[0] or all(
            abs(r[k] - results[0][k]) < 1e-6 for k in r if k != "valid/confusion_matrix"
        )


def test_nothing_heavy_is_imported_before_the_first_step(tmp_path):
    """Fixed cost per run: up to the first optimizer step a `dist-train train` process has not
    imported FlopCounterMode (a layer list is counted from its shapes), torchmetrics (3.7 s
    with scipy.signal, matplotlib and transformers: imported by the first evaluation, on the
    training thread, not earlier on a thread of its own; README Performance) nor any tracker
    it was not asked for. At exit the evaluation has imported torchmetrics: the probe sees
    imports."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        """name: probe
data: {source: "sklearn:iris", target: target, task: multiclass}
model: {layers: [{linear: 16}, relu, {linear: out}]}
loss: cross_entropy
optimizer: {name: sgd, lr: 0.1}
train: {epochs: 1, batch_size: 16}
metrics: [accuracy, f1]
"""
    )
    first, last = tmp_path / "first.json", tmp_path / "last.json"
    code = f"""import json, sys, threading, torch.optim.optimizer as o
def first_step(*args):
    threads = sorted(t.name for t in threading.enumerate())
    json.dump({{"modules": sorted(sys.modules), "threads": threads}}, open({str(first)!r}, "w"))
    hook.remove()
hook = o.register_optimizer_step_post_hook(first_step)
from dist_train.cli import main
rc = main(["train", {str(recipe)!r}, "-o", {str(tmp_path / "run")!r}])
json.dump(sorted(sys.modules), open({str(last)!r}, "w"))
sys.exit(rc)
"""
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    probe, at_exit = json.loads(first.read_text()), set(json.loads(last.read_text()))
    at_first = set(probe["modules"])
    # No thread besides the main one: nothing imports in the background.
    assert probe["threads"] == ["MainThread"], probe["threads"]
    heavy = {"torch.utils.flop_counter", "torchmetrics"}
    trackers = {"wandb", "tensorboard", "torch.utils.tensorboard"}
    assert not (heavy | trackers) & at_first, sorted((heavy | trackers) & at_first)
    assert "torchmetrics" in at_exit and not trackers & at_exit


def test_the_process_entry_freezes_the_heap_before_exit_and_main_does_not():
    """`dist-train` / `python -m dist_train` run `cli.entry`: the command, then `gc.freeze()`,
    so the interpreter's exit does not garbage-collect every imported module's objects (1.2-1.8
    s of a ~5 s job's process, README Performance). `cli.main`, which tests and notebooks call
    in-process, freezes nothing; both entry points are wired to `entry`."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = """import gc, sys
from dist_train import cli
assert cli.main(["schema"]) == 0 and gc.get_freeze_count() == 0
sys.argv = ["dist-train", "schema"]
print("exit", cli.entry(), "frozen", gc.get_freeze_count())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    words = r.stdout.split()
    assert words[words.index("exit") + 1] == "0" and int(words[-1]) > 1000
    assert '\ndist-train = "dist_train.cli:entry"\n' in (root / "pyproject.toml").read_text()
    assert "sys.exit(entry())" in (root / "dist_train" / "__main__.py").read_text()
