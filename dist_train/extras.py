"""Optional extras: wandb, tensorboard, matplotlib and transformers are not installed with
dist-train itself.

`pip install 'dist-train[wandb]'`, `[tensorboard]`, `[report]` (matplotlib), `[hf]`
(transformers) or `[all]`. Each is
imported only where it is used; a recipe or command that needs a missing one fails with exit 2
and the install line, before any training starts where it can be known then (stdlib only:
finding a package does not import it).
"""

from __future__ import annotations

import importlib.util
import os

from dist_train.errors import UserError

# importable module -> the extra that installs it
EXTRA = {
    "wandb": "wandb",
    "tensorboard": "tensorboard",
    "matplotlib": "report",
    "transformers": "hf",
}


def require(module: str, needed_by: str) -> None:
    """UserError naming the extra to install when `module` is not importable."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as missing
        found = False
    if not found:
        raise missing(module, needed_by)


def missing(module: str, needed_by: str) -> UserError:
    fix = (
        f"Install it with `pip install 'dist-train[{EXTRA[module]}]'` "
        "(or `pip install 'dist-train[all]'` for every extra)"
    )
    if needed_by.startswith("tracking."):  # a recipe key: dropping it is the other way out
        fix += f", or remove `{needed_by}` from the recipe"
    return UserError(f"{needed_by} needs `{module}`, which is not installed. {fix}.")


def wandb_mode(cfg) -> str:
    """The mode a `tracking.wandb` section runs in: the recipe's, else $WANDB_MODE, else
    offline (a compute node without network never waits on wandb)."""
    return cfg.mode or os.environ.get("WANDB_MODE") or "offline"


def require_trackers(tracking) -> None:
    """Every tracker the recipe's `tracking` section asks for is installed (call it before
    starting processes or queueing jobs; wandb in disabled mode needs nothing)."""
    if tracking.wandb is not None and wandb_mode(tracking.wandb) != "disabled":
        require("wandb", "tracking.wandb")
    if tracking.tensorboard:
        require("tensorboard", "tracking.tensorboard")
