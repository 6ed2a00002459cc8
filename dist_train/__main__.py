"""`python -m dist_train ...` (also under `accelerate launch -m` and `torchrun -m`)."""

import sys

from dist_train.cli import entry

sys.exit(entry())
