"""Stand-in for `python -m dist_train train` that follows the preemption contract.

Used by the SLURM tests until the real trainer can run there: each rank records
what it saw (world size, restart count) in RUN_DIR/ranks.jsonl; on USR1/TERM it
"checkpoints" (RUN_DIR/ckpt), rank 0 touches $DIST_TRAIN_REQUEUE_FILE, and all
ranks exit 75. A run that finds RUN_DIR/ckpt finishes at once with exit 0.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    assert argv[0] == "train" and argv[2] == "-o", argv
    run_dir = Path(argv[3])
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    stop: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stop.append(s))
    resumed = (run_dir / "ckpt").exists()
    info = {
        "rank": rank,
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "resumed": resumed,
        "recipe": argv[1],
        "overrides": argv[4:],
    }
    with open(run_dir / "ranks.jsonl", "a") as f:
        f.write(json.dumps(info) + "\n")
    deadline = time.time() + (0 if resumed else float(os.environ.get("FAKE_TRAIN_S", "120")))
    while time.time() < deadline and not stop:
        time.sleep(0.05)
    if not stop:
        return 0
    if rank == 0:
        (run_dir / "ckpt").write_text(f"signal {stop[0]}\n")
        Path(os.environ["DIST_TRAIN_REQUEUE_FILE"]).touch()
    return 75


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
