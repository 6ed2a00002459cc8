"""dist_train vs a hand-tuned PyTorch loop on identical work, alternating A B A B.

    .venv/bin/python benchmarks/run.py              # full sizes (~5 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick      # tiny sizes, a smoke test (< 1 min)
    .venv/bin/python benchmarks/run.py --rounds 7 --cases mlp_bs64,eval

Every measurement is a fresh subprocess (no warm caches shared between A and B); the two
implementations alternate within each round, and each round gives one paired ratio, so slow
drift from other load on the machine cancels. Printed: medians and the median paired ratio per
case against its target; JSON goes to benchmarks/results/.

Cases
- mlp_bs64, mlp_bs512: MLP 32-256-256-10 (ReLU, dropout 0.1), 200k x 32 rows, 10 classes,
  SGD lr 1e-3 momentum 0.95, one epoch. dist_train as users run it: console lines, jsonl log,
  validation and an atomic checkpoint per epoch, model export. The plain loop (plain.py)
  validates and checkpoints each epoch too. Timed: from the data being in memory to the end
  (model build, loop, validation, checkpoint, export); loading the files and the one-time
  imports are the `startup` case's business. Ratio = plain seconds / dist_train seconds (the
  samples/s ratio), >= 0.95 wanted.
- digits_cnn: recipes/digits_cnn.yaml (15 epochs, shift augmentation, AdamW + cosine).
- eval: exact loss + accuracy over all 200k rows at batch 64: dist_train's evaluate()
  (accelerate loader, gather_for_metrics, torchmetrics) vs a hand loop (argmax). >= 0.90.
- startup_*: the fixed cost per run, in fresh processes: `dist-train train RECIPE` as a user
  runs it vs `python plain.py` (which reads the same parquet files with pyarrow). Whole-process
  wall time, process start -> first optimizer step, and the peak RSS of the whole run;
  <= 1.15x, <= 1.15x and <= plain + 100 MiB. startup_mlp_bs64 is the ~5 s job of issue 12
  (200k-row parquet MLP, 1 epoch, batch 64); its data is generated into the work folder.
  startup_mlp_bs64_loss_only: the same job with `metrics: []`, so dist_train never imports
  torchmetrics: the framework's own fixed cost, apart from that import's.
  Code: benchmarks/fixed_cost.py.
- weights: the MLP without dropout (bs 512, fp32) trained by both; max |difference| of the
  final weights (same data order, init and math: expected 0 up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # plain.py, fixed_cost.py
from fixed_cost import compile_sources, row, startup, startup_line, startup_rows

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = {"train": 0.95, "eval": 0.90, "startup": 1.15, "total": 1.15, "rss_mib": 100.0}


def sizes(quick: bool) -> dict:
    return {
        "rows": 4_000 if quick else 200_000,
        "valid": 1_000 if quick else 20_000,
        "digits_epochs": 2 if quick else 15,
        "rounds": 1 if quick else 5,
    }


def case_table(quick: bool) -> dict:
    s = sizes(quick)
    mlp = {"kind": "mlp", "seed": 0, "epochs": 1, "dropout": 0.1, "log_every": 50}
    return {
        "mlp_bs64": mlp | {"batch_size": 64, "eval_batch_size": 64},
        # The same job with the recipe asking for no metric (validation loss only): dist_train
        # then never imports torchmetrics, which splits the fixed cost into the framework's and
        # that one import's. (plain.py still counts its argmax accuracy: ~1 ms.)
        "mlp_bs64_loss_only": mlp | {"batch_size": 64, "eval_batch_size": 64, "metrics": []},
        "mlp_bs512": mlp | {"batch_size": 512, "eval_batch_size": 512},
        "weights": mlp | {"batch_size": 512, "eval_batch_size": 512, "dropout": 0.0},
        "digits_cnn": {
            "kind": "digits",
            "seed": 0,
            "epochs": s["digits_epochs"],
            "batch_size": 64,
            "eval_batch_size": 64,
            "shift": 1,
            "log_every": 20,
        },
        "eval": {"kind": "mlp", "batch_size": 64},
    }


def mlp_recipe(work: Path, case: dict) -> str:
    drop = f"{{dropout: {case['dropout']}}}, " if case["dropout"] else ""
    return f"""name: bench-mlp
seed: 0
data: {{source: "parquet:{work}/train.parquet", valid_source: "parquet:{work}/valid.parquet",
       target: target, task: multiclass, num_classes: 10}}
model:
  layers: [{{linear: 256}}, relu, {drop}{{linear: 256}}, relu, {drop}{{linear: out}}]
loss: cross_entropy
optimizer: {{name: sgd, lr: 1.0e-3, momentum: 0.95}}
train: {{epochs: 1, batch_size: {case["batch_size"]}, log_every_steps: {case["log_every"]}}}
metrics: [{", ".join(case.get("metrics", ["accuracy"]))}]
"""


def prepare(work: Path, quick: bool) -> dict:
    """Data files, recipes and the shared initial weights (built by dist_train's own builder)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    s, cases = sizes(quick), case_table(quick)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((32, 10)).astype(np.float32)
    for name, n in (("train", s["rows"]), ("valid", s["valid"])):
        x = rng.standard_normal((n, 32)).astype(np.float32)
        y = np.argmax(x @ teacher + rng.standard_normal((n, 10)).astype(np.float32), axis=1)
        cols = {f"f{i}": x[:, i] for i in range(32)} | {"target": y.astype(np.int64)}
        pq.write_table(pa.table(cols), work / f"{name}.parquet")
    for name, case in cases.items():
        if case["kind"] == "mlp" and name != "eval":
            case["recipe"] = str(work / f"{name}.yaml")
            Path(case["recipe"]).write_text(mlp_recipe(work, case))
        elif case["kind"] == "digits":
            case["recipe"] = str(ROOT / "recipes" / "digits_cnn.yaml")
            case["overrides"] = [f"train.epochs={case['epochs']}"]
    (work / "cases.json").write_text(json.dumps(cases, indent=1))
    from dist_train import build
    from dist_train.config.recipe import load_recipe
    from dist_train.data.sources import DataBundle, Table

    for name, case in cases.items():
        if "recipe" not in case:
            continue
        recipe = load_recipe(case["recipe"], case.get("overrides", []))
        if case["kind"] == "mlp":  # the builder needs only the shapes: skip reading 200k rows
            rows = Table(torch.zeros(2, 32), torch.zeros(2, dtype=torch.int64))
            data = DataBundle(rows, rows, (32,), list(range(10)))
        else:
            data = build.build_data(recipe)
        net = build.build_net(recipe, data, build.make_head(recipe, data)[0])
        case["init"] = str(work / f"init-{name}.pt")
        torch.save(net.state_dict(), case["init"])
    cases["eval"]["init"] = cases["mlp_bs512"]["init"]
    return cases


# ---------------------------------------------------------------- workers (fresh processes)


def worker(mode: str, name: str, work: Path, out: Path) -> None:
    case = json.loads((work / "cases.json").read_text())[name]
    sys.path.insert(0, str(HERE))
    import plain

    plain.warm_up()  # one-time imports of the first optimizer step: not part of any timing
    if mode.endswith("-dist"):  # likewise the imports dist_train makes lazily on its way
        import accelerate  # noqa: F401
        import torchmetrics  # noqa: F401
    if mode == "train-plain":
        import torch

        res = plain.train(case, work)
        torch.save(res.pop("state"), out.with_suffix(".pt"))
    elif mode == "train-dist":
        res = dist_train_run(case, work, out)
    elif mode == "eval-plain":
        res = plain.evaluate(case, work)
    else:
        res = dist_eval(case, work)
    res["peak_rss_mib"] = plain.peak_rss_mib()
    out.write_text(json.dumps(res, default=float))


def dist_train_run(case: dict, work: Path, out: Path) -> dict:
    """`train()` as the CLI calls it; the clock starts once the data is in memory."""
    import torchmetrics  # noqa: F401  one-time import cost: measured by the startup case
    from safetensors.torch import load_file

    from dist_train import build
    from dist_train.config.recipe import load_recipe
    from dist_train.training.trainer import train

    recipe = load_recipe(case["recipe"], case.get("overrides", []))
    marks = {}
    original = build.build_data

    def timed_build_data(r):
        t, c = time.perf_counter(), time.process_time()
        data = original(r)
        marks["load"], marks["load_cpu"] = time.perf_counter() - t, time.process_time() - c
        return data

    build.build_data = timed_build_data
    run_dir = work / "runs" / out.stem
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(recipe, str(run_dir), restart=True)
    seconds = time.perf_counter() - t0 - marks["load"]
    cpu_seconds = time.process_time() - c0 - marks["load_cpu"]
    import torch

    torch.save(load_file(run_dir / "model.safetensors"), out.with_suffix(".pt"))
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # seconds/step per log interval, full intervals only (plain.py records only those)
    step_times = [
        r["step_time"]
        for r in log
        if r.get("event") == "train" and r["step"] % case["log_every"] == 0
    ]
    steps = build.total_steps(recipe, case["rows"]) if "rows" in case else None
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "step_times": step_times,
        "load_seconds": marks["load"],
        "steps": steps,
        "valid": {k: v for k, v in result.items() if not isinstance(v, list)},
    }


def dist_eval(case: dict, work: Path) -> dict:
    """dist_train's evaluation path: accelerate-prepared loader, gather_for_metrics, exact
    loss and torchmetrics accuracy over every row."""
    import torch
    import torchmetrics  # noqa: F401  (import cost is the startup case's business)

    sys.path.insert(0, str(HERE))
    import plain

    from dist_train.config.recipe import load_recipe
    from dist_train.data.loaders import make_loader
    from dist_train.data.sources import Table
    from dist_train.model.head import Head
    from dist_train.training.distributed import make_accelerator
    from dist_train.training.evaluate import evaluate
    from dist_train.training.metrics import MetricSet

    recipe = load_recipe(str(work / "weights.yaml"), [])
    # The recipe's head (plain cross-entropy: no loss weights that need the data).
    head = Head(recipe.data.task, recipe.loss.name, recipe.loss.label_smoothing)
    x, y = plain.load_parquet(work / "train.parquet")
    model = plain.mlp(0.1)
    model.load_state_dict(
        dict(zip(model.state_dict(), torch.load(case["init"]).values(), strict=True))
    )
    # Warm-up pass on 64 rows (the plain side has one too): the accelerator, prepare and the
    # first metric update import modules once (~1 s: the startup cases' business, not eval's).
    warm = make_accelerator(recipe)
    evaluate(
        warm.prepare(model),
        warm.prepare(make_loader(Table(x[:64], y[:64]), 64, False, False)),
        head,
        MetricSet(["accuracy"], "multiclass", 10, warm.device),
        warm,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    acc = make_accelerator(recipe)
    loader = acc.prepare(make_loader(Table(x, y), case["batch_size"], False, False))
    model = acc.prepare(model)
    metrics = MetricSet(["accuracy"], "multiclass", 10, acc.device)
    result = evaluate(model, loader, head, metrics, acc)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "rows": result["valid/rows"],
        "loss": result["valid/loss"],
        "accuracy": result["valid/accuracy"],
    }


def run_worker(
    mode: str, name: str, work: Path, tag: str, inline: bool = False, src: str | None = None
) -> dict:
    """A fresh process per measurement; `inline` (--quick only) runs it in this process;
    `src`: import dist_train from that directory (--baseline-src)."""
    out = work / f"res-{tag}.json"
    if inline and not src:
        worker(mode, name, work, out)
        return json.loads(out.read_text())
    env = os.environ | {"HF_DATASETS_CACHE": str(work / "hf-cache"), "WANDB_MODE": "disabled"}
    if src:
        env["PYTHONPATH"] = src
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", mode, name, str(work), str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {mode} {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------- driver


def weight_diff(a: Path, b: Path) -> float:
    import torch

    def plain_names(state: dict) -> dict:  # dist_train's Net: input_norm.* / layers.N.*
        strip = ("layers.", "body.", "input_norm.")
        return {
            next((k.removeprefix(p) for p in strip if k.startswith(p)), k): v
            for k, v in state.items()
        }

    sa, sb = plain_names(torch.load(a)), plain_names(torch.load(b))
    assert sa.keys() == sb.keys(), (sorted(sa), sorted(sb))
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def measure(
    cases: list[str],
    table: dict,
    work: Path,
    rounds: int,
    inline: bool,
    baseline: str | None = None,
) -> dict:
    runs: dict[str, list] = {c: [] for c in cases}
    if any(c.startswith("startup_") for c in cases):
        for src in (None, baseline) if baseline else (None,):
            compile_sources(work, src)
    for r in range(rounds):
        for name in cases:
            impls = ["plain", "dist"]
            if baseline:
                impls.append("before")  # another dist_train source tree, e.g. the last commit
            order = impls if r % 2 == 0 else impls[::-1]  # A B, then B A
            pair = {}
            for impl in order:
                tag = f"{name}-{impl}-{r}"
                src = baseline if impl == "before" else None
                kind = "plain" if impl == "plain" else "dist"
                if name.startswith("startup_"):
                    sub = name.removeprefix("startup_")
                    pair[impl] = startup(impl, sub, table[sub], work, tag, inline, src)
                elif name == "eval":
                    pair[impl] = run_worker(f"eval-{kind}", name, work, tag, inline, src)
                else:
                    pair[impl] = run_worker(f"train-{kind}", name, work, tag, inline, src)
                    pair[impl]["weights"] = str(work / f"res-{tag}.pt")
            if "weights" in pair["plain"]:
                pair["max_weight_diff"] = weight_diff(
                    Path(pair["plain"]["weights"]), Path(pair["dist"]["weights"])
                )
            runs[name].append(pair)
            print(f"  round {r + 1}/{rounds} {name}: {summary_line(name, pair)}", flush=True)
    return runs


def summary_line(name: str, pair: dict) -> str:
    if name.startswith("startup_"):
        return startup_line(pair)
    line = (
        f"plain {pair['plain']['seconds']:.3f}s dist {pair['dist']['seconds']:.3f}s "
        f"ratio {pair['plain']['seconds'] / pair['dist']['seconds']:.3f}"
    )
    if "before" in pair:
        line += (
            f"; baseline {pair['before']['seconds']:.3f}s ratio "
            f"{pair['plain']['seconds'] / pair['before']['seconds']:.3f}"
        )
    return line


def report(runs: dict, table: dict) -> list[dict]:
    rows = []
    med = statistics.median
    for name, pairs in runs.items():
        if not pairs:
            continue
        if name.startswith("startup_"):
            rows += startup_rows(name, pairs, TARGETS)
            continue
        sp = [p["plain"]["seconds"] for p in pairs]
        sd = [p["dist"]["seconds"] for p in pairs]
        ratio = med(p / d for p, d in zip(sp, sd, strict=True))
        want = TARGETS["eval" if name == "eval" else "train"]
        r = row(
            f"{name} (s)",
            med(sp),
            med(sd),
            ratio,
            f">= {want}",
            ratio >= want,
            f"{want - ratio:.3f} below the target",
        )
        if "max_weight_diff" in pairs[0]:
            r["max_weight_diff"] = max(p["max_weight_diff"] for p in pairs)
        r["paired_ratios"] = [round(p / d, 4) for p, d in zip(sp, sd, strict=True)]
        if "before" in pairs[0]:
            sb = [p["before"]["seconds"] for p in pairs]
            r["baseline_ratio"] = med(p / b for p, b in zip(sp, sb, strict=True))
        # CPU seconds of the process: far less sensitive than wall time to other load on a
        # shared machine (but includes OpenMP spin-waiting, so not immune either).
        cp = [p["plain"]["cpu_seconds"] for p in pairs]
        r["cpu_ratio"] = med(p / d["dist"]["cpu_seconds"] for p, d in zip(cp, pairs, strict=True))
        if "before" in pairs[0]:
            r["baseline_cpu_ratio"] = med(
                p / d["before"]["cpu_seconds"] for p, d in zip(cp, pairs, strict=True)
            )
        if pairs[0]["plain"].get("step_times") and pairs[0]["dist"].get("step_times"):
            # Median seconds/step over log intervals: robust to bursts of load from other jobs
            # on a shared machine (a burst spoils a few intervals, not the median).
            def steady(p, impl):
                return med(p[impl]["step_times"])

            r["steady_ratio"] = med(steady(p, "plain") / steady(p, "dist") for p in pairs)
            r["steady_ms_per_step"] = {
                "plain": med(steady(p, "plain") for p in pairs) * 1e3,
                "dist": med(steady(p, "dist") for p in pairs) * 1e3,
            }
            if "before" in pairs[0]:
                r["baseline_steady_ratio"] = med(
                    steady(p, "plain") / steady(p, "before") for p in pairs
                )
        rows.append(r)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'case':44} {'plain':>9} {'dist':>9} {'ratio':>8}  {'target':>12}  result")
    for r in rows:
        ratio = r.get("ratio", r.get("+MiB"))
        note = "ok" if r["met"] else f"MISS: {r['miss']}"
        if "steady_ratio" in r:
            note += f"  [steady-state step ratio {r['steady_ratio']:.3f}"
            if "baseline_steady_ratio" in r:
                note += f", baseline tree {r['baseline_steady_ratio']:.3f}"
            note += "]"
        if "cpu_ratio" in r:
            note += f"  [cpu-time ratio {r['cpu_ratio']:.3f}]"
        if "baseline_ratio" in r:
            note += (
                f"  (baseline tree: {r['baseline_ratio']:.3f}, cpu {r['baseline_cpu_ratio']:.3f})"
            )
        if "max_weight_diff" in r:
            note += f"  (max |w_plain - w_dist| {r['max_weight_diff']:.1e})"
        if "range" in r:
            note += f"  [rounds {r['range'][0]:.3f} .. {r['range'][1]:.3f}]"
        if "before_range" in r:
            lo, hi = r["before_range"]
            note += f"  (baseline tree: {r['before']:.3f}, rounds {lo:.3f} .. {hi:.3f})"
        print(
            f"{r['case']:44} {r['plain']:9.3f} {r['dist_train']:9.3f} {ratio:8.3f}  "
            f"{r['target']:>12}  {note}"
        )
    print(
        "ratio: training/eval = plain time / dist_train time (samples/s ratio, higher is better);"
        " startup = dist/plain; RSS = dist - plain (MiB)"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke test)")
    ap.add_argument("--rounds", type=int, help="rounds of A B pairs (default 5; quick 1)")
    ap.add_argument("--cases", help="comma-separated subset (default: all)")
    ap.add_argument("--work", help="scratch directory (default benchmarks/results/work[-quick])")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<time>.json)")
    ap.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for every measured process, both sides (a machine shared with "
        "other jobs: spinning OpenMP threads make timings erratic)",
    )
    ap.add_argument(
        "--baseline-src",
        help="also time dist_train imported from this directory "
        "(e.g. `git archive HEAD dist_train | tar -x -C DIR`), paired in each round",
    )
    args = ap.parse_args()
    all_cases = [
        "weights",
        "mlp_bs64",
        "mlp_bs512",
        "digits_cnn",
        "eval",
        "startup_digits_cnn",
        "startup_mlp_bs64",
        "startup_mlp_bs64_loss_only",
    ]
    cases = args.cases.split(",") if args.cases else all_cases
    unknown = set(cases) - set(all_cases)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; choose from {all_cases}")
    if args.threads:  # inherited by every subprocess, dist_train's and plain.py's alike
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    results = HERE / "results"
    work = Path(args.work or results / ("work-quick" if args.quick else "work"))
    rounds = args.rounds or sizes(args.quick)["rounds"]
    print(f"preparing data in {work} ...", flush=True)
    table = prepare(work, args.quick)
    for c in table.values():
        c["rows"] = sizes(args.quick)["rows"]
    (work / "cases.json").write_text(json.dumps(table, indent=1))
    load = os.getloadavg()
    print(
        f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} "
        f"cores; {rounds} round(s), A/B order alternating",
        flush=True,
    )
    t0 = time.time()
    runs = measure(cases, table, work, rounds, inline=args.quick, baseline=args.baseline_src)
    rows = report(runs, table)
    print_table(rows)
    load_after = os.getloadavg()
    import torch

    doc = {
        "quick": args.quick,
        "rounds": rounds,
        "threads": args.threads,
        "cases": cases,
        "rows": rows,
        "runs": runs,
        "load_before": load,
        "load_after": load_after,
        "seconds": time.time() - t0,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
    }
    out = Path(args.out) if args.out else results / time.strftime("bench-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=float))
    print(f"load average after: {load_after[0]:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
