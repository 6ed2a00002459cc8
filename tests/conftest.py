"""Session-wide test plumbing: `tests/` on the import path (procs.py), the SLURM marker put on
every test that uses the cluster, and reference runs trained once per session and shared.

Two loops (see the Makefile): `make test-fast` runs `-m "not slow and not dist and not slurm"`
with DIST_TRAIN_TEST_FAST=1, where a torchrun launch or the SLURM cluster fails the test that
asks for it (procs.forbid_in_fast_loop); `make test` runs everything.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import cli, cli_here

SLURM_FIXTURES = {"slurm_cluster", "slurm_jobs"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that needs the cluster is a SLURM test whatever its module says: the marker can
    # not be forgotten, so `-m "not slurm"` never installs SLURM.
    for item in items:
        if SLURM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slurm)


SLURM_DIR = "tests/slurm/"  # every test that uses the cluster lives here (test_layout checks it)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test` runs two pytest-xdist workers that take whole test files, so a file's
    module- and session-scoped runs (reference runs, the one torchrun launch of every shipped
    recipe) are made once, not once per worker. Every file under tests/slurm/ goes to ONE
    worker as one unit: it starts the one local cluster (a session fixture) and runs the SLURM
    tests in order while the other worker takes the CPU-bound files. (xdist's `--dist
    loadgroup` marks do not reach its scheduler under pytest 9.2, whose node ids no longer
    come from `_nodeid`; this is `--dist loadfile` with the SLURM folder as one file.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FilesWithSlurmTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if nodeid.startswith(SLURM_DIR) else nodeid.split("::", 1)[0]

    return FilesWithSlurmTogether(config, log)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """`reference_run(recipe, *overrides, nproc=1, **env) -> run dir`: an uninterrupted
    training, done once per session for each (recipe text, overrides, nproc, env) and shared by
    the tests that compare against it. Read-only by convention: copy it to change it."""
    done: dict[str, Path] = {}

    def get(recipe: Path, *overrides: str, nproc: int = 1, **env: str) -> Path:
        key_text = "\n".join(
            [Path(recipe).read_text(), *overrides, str(nproc), repr(sorted(env.items()))]
        )
        key = hashlib.sha1(key_text.encode()).hexdigest()[:12]
        if key not in done:
            out = tmp_path_factory.mktemp(f"reference-{key}") / "run"
            args = ("train", str(recipe), "-o", str(out), *overrides)
            # One process: in this process (no import cost); N: a real torchrun launch.
            r = cli_here(*args, **env) if nproc == 1 else cli(*args, nproc=nproc, **env)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
            done[key] = out
        return done[key]

    return get


def _make_pretrained():
    """recipes/make_pretrained.py as a module (it is a script, not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "recipes" / "make_pretrained.py"
    spec = importlib.util.spec_from_file_location("make_pretrained", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def hf_text(tmp_path_factory) -> Path:
    """reviews.csv and a tiny BERT directory (random weights, WordPiece tokenizer), as
    recipes/make_pretrained.py writes them: the text recipe's inputs, without the ViT."""
    root = tmp_path_factory.mktemp("hf_text")
    make = _make_pretrained()
    make.make_reviews(root / "reviews.csv")
    make.make_bert(root / "bert-tiny", root / "reviews.csv")
    return root


@pytest.fixture(scope="session")
def local_models(tmp_path_factory) -> Path:
    """Everything recipes/make_pretrained.py makes (the ViT pretrained a few steps only)."""
    root = tmp_path_factory.mktemp("local_models")
    _make_pretrained().main(["--out", str(root), "--quick"])
    return root
