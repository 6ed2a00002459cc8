"""README's layout block names every module of dist_train/, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_layout() -> set[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- layout:", 1)[1].split("```", 2)[1]
    listed: set[str] = set()
    for line in block.strip().splitlines():
        words = line.split()
        folder = "" if words[0] == "dist_train/" else words[0]
        assert folder == "" or re.fullmatch(r"[a-z_]+/", folder), line
        listed |= {folder + w for w in words[1:]}
    return listed


def _tree() -> set[str]:
    pkg = ROOT / "dist_train"
    found = {
        str(p.relative_to(pkg))
        for p in pkg.rglob("*.py")
        if p.name != "__init__.py" and "templates" not in p.parts
    }
    found |= {str(p.relative_to(pkg)) + "/" for p in pkg.rglob("templates") if p.is_dir()}
    return found


def test_readme_layout_matches_the_package_tree():
    listed, tree = _readme_layout(), _tree()
    assert not tree - listed, f"modules missing from README's layout: {sorted(tree - listed)}"
    assert not listed - tree, f"README lists modules that do not exist: {sorted(listed - tree)}"


def test_each_subpackage_registers_its_own_subcommands():
    """Every folder of dist_train/ is a package; every `cli.py` among them is in cli.py's list,
    and the subcommands each one registers are the ones it claims (no special cases)."""
    import argparse

    from dist_train import cli

    pkg = ROOT / "dist_train"
    folders = [p for p in pkg.iterdir() if p.is_dir() and p.name not in ("__pycache__",)]
    assert all((p / "__init__.py").exists() for p in folders)
    with_cli = {f"dist_train.{p.name}.cli" for p in folders if (p / "cli.py").exists()}
    assert with_cli == set(cli.SUBCOMMAND_MODULES)
    seen: dict[str, str] = {}
    for name in cli.SUBCOMMAND_MODULES:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        __import__(name, fromlist=["register"]).register(sub)
        for command in sub.choices:
            assert command not in seen, f"{command} registered by {seen.get(command)} and {name}"
            seen[command] = name
    assert set(seen) == set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert {"train", "check", "summary", "eval", "predict", "report", "schema", "submit"} <= set(
        seen
    )


def test_cluster_tests_live_in_tests_slurm():
    """`make test`'s xdist scheduler (tests/conftest.py) keeps tests/slurm/ on one worker, the
    one that starts the local cluster: a test elsewhere that asks for it would start a second."""
    asks = re.compile(r"\bslurm_(jobs|cluster)\b|mark\.slurm\b")
    outside = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("*.py")
        if "slurm" not in p.relative_to(ROOT / "tests").parts[:1]
        and p.name != "conftest.py"
        and asks.search(p.read_text())
    ]
    assert outside == [], f"move these SLURM tests under tests/slurm/: {outside}"
