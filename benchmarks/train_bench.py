"""Training throughput of `dmf train` on ML-20M-sized tables (138K users, 27K items), and whether the
allreduce variants reach the same accuracy.

    .venv/bin/python -m benchmarks.train_bench                # samples/s table
    .venv/bin/python -m benchmarks.train_bench --accuracy-data work/prepared/ml-100k --config conf/ml-100k.yaml \\
        --models mf --optimizers adagrad --set train.item_history=false    # same accuracy?

Throughput: each variant (model x optimizer x dense allreduce, fp16-compressed allreduce, or sparse
gradients) runs through the real launcher for a few epochs; samples/s is that of the training steps of
the fastest epoch after the first, over all ranks together. A plain single-process PyTorch loop with
the same global batch runs in the same run as the reference, and the allgather of one batch's rows
alone tells what the exchange costs. Accuracy: the same variants trained to
early stopping on a real split, compared by validation RMSE. Writes docs/benchmarks/train-throughput.md or
train-accuracy.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, WORK, command, machine, ml20m_sized
from pipeline import artifacts, config, storage
from pipeline.models import registry
from pipeline.models.spec import ModelSpec
from pipeline.spark import session
from pipeline.training import train

VARIANTS = [  # (optimizer, gradients)
    ("adam", "dense"), ("adagrad", "dense"), ("adagrad", "fp16"), ("adagrad", "sparse")]
ONE_RANK_TOO = [("adam", "dense"), ("adagrad", "sparse")]  # the default and the fastest, also on one rank


def overrides(optimizer: str, gradients: str) -> list[str]:
    return [f"train.optimizer={optimizer}", f"train.fp16_allreduce={gradients == 'fp16'}",
            f"train.sparse_gradients={gradients == 'sparse'}"]


def plain_loop(n_users: int, n_items: int, dim: int, batch: int, steps: int = 20) -> float:
    """samples/s of the simplest single-process loop: mf, Adam, random pairs, no Horovod, no Spark."""
    torch.manual_seed(0)
    spec = ModelSpec(model="mf", n_users=n_users, n_items=n_items, user_dim=dim, item_dim=dim, hidden=[], dropout=0.0,
                     batch_norm=False, head="regression", rating_levels=[1, 2, 3, 4, 5], global_mean=3.5, n_genres=0,
                     max_genres=0)
    model = registry.build(spec)
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    u, i = torch.randint(n_users, (batch * steps,)), torch.randint(n_items, (batch * steps,))
    r = torch.randint(1, 6, (batch * steps,)).float()
    started = None
    for s in range(steps):
        if s == 2:  # skip warm-up
            started = time.time()
        sl = slice(s * batch, (s + 1) * batch)
        opt.zero_grad()
        model.loss(u[sl], i[sl], r[sl]).backward()
        opt.step()
    return batch * (steps - 2) / (time.time() - started)


def exchange_alone(rows: list[int], dim: int, steps: int = 20) -> float:
    """ms a step for 2 ranks to allgather `rows` rows of `dim` floats and their indices per table, with nothing
    else running: what a step under sparse gradients spends on the exchange at the least."""
    import horovod

    return horovod.run(_allgather_rows, args=(rows, dim, steps), num_proc=2, use_gloo=True)[0]


def _allgather_rows(rows: list[int], dim: int, steps: int) -> float:
    import horovod.torch as hvd

    hvd.init()
    tensors = [t for n in rows for t in (torch.randn(n, dim), torch.arange(n))]
    for step in range(steps + 3):
        if step == 3:  # skip warm-up
            started = time.time()
        for handle in [hvd.allgather_async(t, name=f"rows.{k}") for k, t in enumerate(tensors)]:
            hvd.synchronize(handle)
    return (time.time() - started) / steps * 1000


def batch_rows(data: str, manifest: dict, batch: int) -> tuple[int, int]:
    """Distinct users and items in a random batch of training pairs."""
    pairs = artifacts.read_table(data, manifest, "train", ["user_idx", "item_idx"]).sample(batch, random_state=0)
    return pairs.user_idx.nunique(), pairs.item_idx.nunique()


def run(spark, conf: str | None, data: str, out: str, settings: list[str]) -> dict:
    cfg = config.load(conf, settings)
    return train.train(spark, cfg, data, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared ML-20M-sized set (default: synthesize --ratings ratings)")
    parser.add_argument("--ratings", type=int, default=4_000_000)
    parser.add_argument("--batch", type=int, default=32768, help="per rank")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--models", default="mf,dmf")
    parser.add_argument("--optimizers", default="adam,adagrad", help="the variants of these optimizers only")
    parser.add_argument("--gradients", default="dense,fp16,sparse", help="the variants of these exchanges only")
    parser.add_argument("--ranking-dims", default="0,64",
                        help="train.ranking_dim of each throughput run: 0 is the rating objective alone, more adds "
                             "the ranking objective's tables (pipeline.training.ranking)")
    parser.add_argument("--accuracy-data", help="a prepared real split: train each variant to early stopping")
    parser.add_argument("--config", help="config for the accuracy runs (e.g. conf/ml-100k.yaml)")
    parser.add_argument("--set", action="append", default=[],
                        help="override for the accuracy runs, e.g. train.item_history=false (sparse gradients "
                             "need it)")
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--out", help="default docs/benchmarks/train-throughput.md or train-accuracy.md")
    args = parser.parse_args()
    variants = [v for v in VARIANTS if v[0] in args.optimizers.split(",") and v[1] in args.gradients.split(",")]
    spark = session(config.load().spark)
    lines = [f"# training benchmark\n\nWritten by `python -m benchmarks.train_bench`. Machine: {machine()}.\n"]
    if args.accuracy_data:
        lines += [f"## Accuracy of the gradient exchange variants on {args.accuracy_data}\n",
                  f"`{command('train_bench')}`, "
                  "2 ranks, trained to early stopping.\n",
                  "| model | optimizer | gradients | valid RMSE | best epoch | seconds |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for model in args.models.split(","):
            for optimizer, gradients in variants:
                m = run(spark, args.config, args.accuracy_data, f"{args.work}/acc-{model}-{optimizer}-{gradients}",
                        [*args.set, f"train.model={model}", *overrides(optimizer, gradients)])
                row = (f"| {model} | {optimizer} | {gradients} | {m['metrics']['valid_rmse']:.4f} | "
                       f"{m['metrics']['best_epoch']} | {m['seconds']:.0f} |")
                print(row, flush=True)
                lines.append(row)
    else:
        data = args.data or ml20m_sized(spark, args.ratings)
        manifest = storage.read_manifest(data, "prepare")
        n_users, n_items = manifest["counts"]["users"], manifest["counts"]["items"]
        reference = plain_loop(n_users, n_items, args.dim, 2 * args.batch)
        users, items = batch_rows(data, manifest, args.batch)
        exchange = exchange_alone([items], args.dim)  # users' rows stay on their rank: the shards split by user
        lines += [f"## Throughput on {n_users:,} users x {n_items:,} items ({manifest['counts']['train']:,} "
                  f"training ratings), embeddings of {args.dim}\n",
                  f"`{command('train_bench')}`: batch "
                  f"{args.batch:,} per rank. Reference, a plain single-process PyTorch loop (mf, Adam, batch "
                  f"{2 * args.batch:,}): {reference:,.0f} samples/s.\n",
                  f"The exchange alone: a batch of {args.batch:,} pairs touches {users:,} users, whose rows stay on "
                  f"their rank under sparse gradients (prepare splits the shards by user), and {items:,} items; "
                  f"allgathering that many item rows of {args.dim} floats and their indices between 2 ranks, with "
                  f"nothing else running, took {exchange:.1f} ms a step: {2 * args.batch / exchange * 1000:,.0f} "
                  f"samples/s if the exchange were all that a step did.\n",
                  "| model | optimizer | gradients | ranking dim | ranks | samples/s | x plain loop |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        print(*lines[-4:-2], sep="\n", flush=True)
        runs = [(model, optimizer, gradients, dim, ranks) for model in args.models.split(",")
                for optimizer, gradients in variants for dim in map(int, args.ranking_dims.split(","))
                for ranks in ((2, 1) if (optimizer, gradients) in ONE_RANK_TOO else (2,))]
        for model, optimizer, gradients, ranking_dim, ranks in runs:
            settings = [f"train.model={model}", f"train.num_proc={ranks}", f"train.epochs={args.epochs}",
                        f"train.user_dim={args.dim}", f"train.item_dim={args.dim}", f"train.ranking_dim={ranking_dim}",
                        f"train.batch_size={args.batch * 2 // ranks}", "train.patience=100",
                        *overrides(optimizer, gradients)]
            m = run(spark, None, data, f"{args.work}/tp-{model}-{optimizer}-{gradients}-{ranking_dim}-{ranks}",
                    settings)
            rate = max(h["samples_per_s"] for h in m["history"][1:] or m["history"])
            row = (f"| {model} | {optimizer} | {gradients} | {ranking_dim} | {ranks} | {rate:,.0f} | "
                   f"{rate / reference:.2f} |")
            print(row, flush=True)
            lines.append(row)
    out = Path(args.out or ROOT / "docs" / "benchmarks" /
               ("train-accuracy.md" if args.accuracy_data else "train-throughput.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
