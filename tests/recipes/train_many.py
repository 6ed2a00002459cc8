"""Train several recipes one after another inside the same processes (run under torchrun):
`train_many.py SPEC.json`, SPEC a list of {"recipe", "overrides", "out"}.

One launch for every shipped recipe instead of one per recipe: the seconds of imports and
process-group start-up are paid once, and the Python API is exercised the way a user's script
under `torchrun`/`accelerate launch` calls it, several runs in one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# This checkout's dist_train (a script's own folder, not the working directory, is on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_train import api
from dist_train.config.recipe import load_recipe

for item in json.loads(Path(sys.argv[1]).read_text()):
    print(f"== {item['recipe']}", flush=True)
    api.train(load_recipe(item["recipe"], item["overrides"]), item["out"])
