"""A small grid search of training hyper-parameters, scored by validation RMSE (or, with --sort ndcg, by the
ranking score's validation NDCG@k) on one prepared split.

    python -m benchmarks.search --config conf/ml-100k.yaml --data work/prepared/ml-100k \
        --grid benchmarks/grids/ml-100k.yaml --out docs/benchmarks/search-ml-100k.md

Each setting trains in this process as one Horovod rank that stands in for `train.num_proc` ranks: the
same global batch (batch_size x num_proc) and the same scaled learning rate. The winners are then
checked with the real multi-rank `dmf train`; the README records both.

The grid file is a list of groups; each group names its fixed settings and the values to cross:
    - fixed: {model: mf}
      vary: {user_dim: [32, 64], l2: [0.02, 0.05]}
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import command
from pipeline import config, storage
from pipeline.training import train
from pipeline.training.loop import rank_main


def settings(grid: list[dict]):
    for group in grid:
        keys = list(group.get("vary", {}))
        for values in itertools.product(*(group["vary"][k] for k in keys)):
            yield {**group.get("fixed", {}), **dict(zip(keys, values))}


def run_one(conf: str, base: list[str], setting: dict, data_dir: str, data: dict) -> dict:
    overrides = base + [f"train.{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                        for k, v in setting.items()]
    if "item_dim" not in setting and "user_dim" in setting:  # mf needs equal sizes
        overrides.append(f"train.item_dim={setting['user_dim']}")
    cfg = config.load(conf, overrides)
    t = cfg.train
    if t.scale_lr:
        t.lr, t.scale_lr = t.lr * t.num_proc, False
    t.batch_size, t.num_proc = t.batch_size * t.num_proc, 1
    spec = train.model_spec(t, data, data_dir)
    with tempfile.TemporaryDirectory() as work:
        job = train.make_job(cfg, data_dir, data, spec, work, resume=False,
                             init=train.initial_parameters(cfg, spec, data_dir, work))
        job["progress"] = False
        started = time.time()
        result = rank_main(job)
    best = min(result["history"], key=lambda h: h["valid_rmse"])
    ranked = max(result["history"], key=lambda h: h.get("valid_ndcg", -1.0))
    return {"setting": setting, "rmse": best["valid_rmse"], "mae": best["valid_mae"], "epoch": best["epoch"],
            "ndcg": ranked.get("valid_ndcg"), "ndcg_epoch": ranked["epoch"], "epochs": len(result["history"]),
            "seconds": time.time() - started}


def table(rows: list[dict], sort: str = "rmse") -> str:
    if sort == "ndcg":
        lines = ["| model | settings | valid NDCG@10 | best epoch / run | valid RMSE | seconds |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for r in sorted(rows, key=lambda r: -(r["ndcg"] or 0)):
            model, shown = _shown(r["setting"])
            lines.append(f"| {model} | {shown} | {r['ndcg']:.4f} | {r['ndcg_epoch']} / {r['epochs']} | "
                         f"{r['rmse']:.4f} | {r['seconds']:.0f} |")
        return "\n".join(lines)
    lines = ["| model | settings | valid RMSE | MAE | best epoch / run | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: r["rmse"]):
        model, shown = _shown(r["setting"])
        lines.append(f"| {model} | {shown} | {r['rmse']:.4f} | {r['mae']:.4f} | {r['epoch']} / {r['epochs']} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


def _shown(setting: dict) -> tuple[str, str]:
    s = dict(setting)
    model = s.pop("model", "")
    return model, ", ".join(f"{k}={v}" for k, v in s.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True, help="a prepared data directory")
    parser.add_argument("--grid", required=True, help="YAML list of {fixed, vary} groups")
    parser.add_argument("--set", action="append", default=[], help="overrides applied to every setting")
    parser.add_argument("--out", help="markdown file for the table")
    parser.add_argument("--sort", choices=("rmse", "ndcg"), default="rmse", help="what the table is ordered by")
    args = parser.parse_args()
    import horovod.torch as hvd

    hvd.init()
    data = storage.read_manifest(args.data, "prepare")
    grid = yaml.safe_load(Path(args.grid).read_text())
    todo = list(settings(grid))
    rows = []
    for n, setting in enumerate(todo, 1):
        rows.append(run_one(args.config, args.set, setting, args.data, data))
        r = rows[-1]
        ndcg = "" if r["ndcg"] is None else f", NDCG@10 {r['ndcg']:.4f} at epoch {r['ndcg_epoch']}"
        print(f"[{n}/{len(todo)}] {setting}: RMSE {r['rmse']:.4f} at epoch {r['epoch']}{ndcg} ({r['seconds']:.0f} s)",
              flush=True)
    text = table(rows, args.sort)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# Hyper-parameter search on {data['dataset']}\n\n"
                                  f"Measured with `{command('search')}`; validation split of {args.data} "
                                  f"({data['counts']['train']:,} train, {data['counts']['valid']:,} validation "
                                  f"ratings). One process stands in for the configured ranks (same global batch "
                                  f"and learning rate).\n\n{text}\n")


if __name__ == "__main__":
    main()
