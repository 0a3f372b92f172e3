"""The train stage: checks everything it can on the driver, starts N Horovod ranks, publishes the model."""
from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np
import pandas as pd
import torch
from pyspark.sql import SparkSession

from pipeline import storage
from pipeline.artifacts import load, model_and_data, read_table, save
from pipeline.config import Config, ConfigError, TrainConfig
from pipeline.models import registry
from pipeline.models.spec import ModelSpec
from pipeline.spark import network_interface
from pipeline.storage import StageError
from pipeline.training.loop import rank_main

log = logging.getLogger(__name__)


def model_spec(t: TrainConfig, data: dict, data_dir: str) -> ModelSpec:
    """The spec of the model train.* describes on this prepared data; ConfigError naming what is wrong."""
    try:
        return ModelSpec.of({
            "model": t.model, "n_users": data["counts"]["users"], "n_items": data["counts"]["items"],
            "user_dim": t.user_dim, "item_dim": t.item_dim, "hidden": list(t.hidden), "dropout": t.dropout,
            "batch_norm": t.batch_norm, "head": t.head, "rating_levels": data["rating_levels"],
            "global_mean": data["global_mean"], "n_genres": len(data["genres"]) if t.genres else 0,
            "max_genres": max(1, data["max_genres"]) if t.genres else 0,
            "item_history": history_length(t, data, data_dir), "ranking_dim": t.ranking_dim,
            "ranking_rating_weight": t.ranking_rating_weight if t.ranking_dim else 0.0})
    except ValueError as e:
        raise ConfigError(str(e)) from e


def history_length(t: TrainConfig, data: dict, data_dir: str) -> int:
    """Training ratings the item history holds: each item's, up to train.history_size (0 without history)."""
    if not t.item_history:
        return 0
    if not t.history_size:
        return data["counts"]["train"]
    return int(np.minimum(read_table(data_dir, data, "items").train_count.to_numpy(), t.history_size).sum())


def item_genres(items: pd.DataFrame, spec: ModelSpec) -> np.ndarray | None:
    """[n_items, max_genres] genre indices by item_idx, padded with n_genres (the EmbeddingBag's padding)."""
    if not spec.n_genres:
        return None
    matrix = np.full((spec.n_items, spec.max_genres), spec.n_genres, dtype=np.int64)
    for idx, genres in zip(items.item_idx, items.genre_idx):
        if genres is not None and len(genres):
            matrix[idx, :len(genres)] = genres
    return matrix



def check(spark: SparkSession, cfg: Config, data_dir: str) -> tuple[dict, ModelSpec]:
    """The data manifest and model spec, or a clear error before any rank starts."""
    data = storage.read_manifest(data_dir, "prepare")
    for split in ("train", "valid"):
        check_plain_parquet(f"{data_dir.rstrip('/')}/{data['paths'][split]}")
    spec = model_spec(cfg.train, data, data_dir)
    n = cfg.train.num_proc
    for split in ("train", "valid"):
        if data["row_groups"][split] < n:
            raise StageError(f"{data_dir}/{split} has {data['row_groups'][split]} row groups, fewer than "
                             f"train.num_proc={n} ranks: prepare again with --set prepare.max_ranks={n}")
    check_slots(spark, n)
    return data, spec


def task_slots(spark: SparkSession) -> tuple[int, str]:
    """How many tasks can run at once, and what limits them: cores, or GPUs where tasks ask for one."""
    sc = spark.sparkContext
    cores = sc.defaultParallelism
    per_task = float(sc.getConf().get("spark.task.resource.gpu.amount", "0"))
    if per_task <= 0:
        return cores, "task slots"
    executors = max(0, sc._jsc.sc().getExecutorMemoryStatus().size() - 1)  # less the driver
    per_executor = float(sc.getConf().get("spark.executor.resource.gpu.amount", "0"))
    gpus = executors * int(per_executor // per_task)
    return (gpus, "GPU task slots") if gpus < cores else (cores, "task slots")


def check_slots(spark: SparkSession, ranks: int, wait_s: float = 60) -> None:
    """Every rank needs a slot at once. Executors register after the session starts on a cluster, so a shortfall
    is waited out for a while before it is an error."""
    deadline = time.time() + wait_s
    slots, kind = task_slots(spark)
    while ranks > slots and not spark.conf.get("spark.master").startswith("local") and time.time() < deadline:
        time.sleep(1)
        slots, kind = task_slots(spark)
    if ranks > slots:
        raise StageError(f"train.num_proc={ranks} ranks need as many Spark {kind}, and this Spark has {slots} "
                         f"(spark.master={spark.conf.get('spark.master')}): lower train.num_proc or add executors")


def check_plain_parquet(path: str) -> None:
    """prepare writes part files only; a summary file (_metadata, _common_metadata) is none of its output and
    can carry a pickle for petastorm (which the ranks never load): a directory holding one is refused."""
    fs, plain = storage.filesystem(path)
    for found in fs.ls(plain, detail=False):
        name = os.path.basename(found.rstrip("/"))
        if name in ("_metadata", "_common_metadata") or not (name.endswith(".parquet") or name.startswith(("_", "."))):
            raise StageError(f"{path}/{name} is not a file that prepare writes (it writes part-*.parquet only): the "
                             f"prepared data may have been tampered with; prepare it again")


def initial_parameters(cfg: Config, spec: ModelSpec, data_dir: str, out: str) -> dict | None:
    """What train.init_from hands the ranks: the weights file and the names of this model's parameters that the
    given model has too (its embeddings and biases, for a dmf started from an mf); None without init_from.
    Everything that can be wrong with it is checked here, before any rank starts."""
    source = cfg.train.init_from
    if not source:
        return None
    if storage.url(source) == storage.url(out):
        raise ConfigError(f"train.init_from={source} is this run's output directory: write the new model elsewhere "
                          f"(--out or --run)")
    model_and_data(source, data_dir)
    weights = f"{source.rstrip('/')}/model.pt"
    given = {name: tuple(value.shape) for name, value in load(weights).items()}
    with torch.device("meta"):  # shapes only: no memory for the tables
        wanted = {name: tuple(p.shape) for name, p in registry.build(spec).named_parameters()}
    shared = [name for name in wanted if name in given]
    wrong = [f"{name} is {given[name]} there and {wanted[name]} here" for name in shared if given[name] != wanted[name]]
    if wrong:
        raise ConfigError(f"train.init_from={source}: parameters of the same name must have the same shape, and "
                          f"{'; '.join(wrong)} (train.user_dim and train.item_dim set the embeddings')")
    if not shared:
        kind = storage.read_manifest(source, "train")["spec"]["model"]
        raise ConfigError(f"train.init_from={source} is a {kind} model that shares no parameter with this "
                          f"{spec.model} model")
    log.info("train: %s start from %s", ", ".join(shared), source)
    return {"weights": weights, "names": shared}


def make_job(cfg: Config, data_dir: str, data: dict, spec: ModelSpec, work: str, resume: bool,
             init: dict | None = None) -> dict:
    """Everything a rank needs, as plain picklable values."""
    return {"train": cfg.train, "spec": spec, "resume": resume, "init": init,
            "relevant_rating": cfg.evaluate.relevant_rating, "k": cfg.evaluate.k,
            "item_genres": item_genres(read_table(data_dir, data, "items"), spec),
            "train_url": storage.url(f"{data_dir.rstrip('/')}/{data['paths']['train']}"),
            "valid_url": storage.url(f"{data_dir.rstrip('/')}/{data['paths']['valid']}"),
            "checkpoint": f"{work}/checkpoint.pt", "weights": f"{work}/best.pt",
            "progress": sys.stdout.isatty()}


def train(spark: SparkSession, cfg: Config, data_dir: str, out: str, resume: bool = False,
          force: bool = False) -> dict:
    import horovod.spark

    storage.check_output(out, "train", force)
    data, spec = check(spark, cfg, data_dir)
    init = initial_parameters(cfg, spec, data_dir, out)
    work = checkpoint_dir(out, resume)
    job = make_job(cfg, data_dir, data, spec, work, resume, init)
    log.info("train: %s on %s ratings, %d ranks", cfg.train.model, f"{data['counts']['train']:,}", cfg.train.num_proc)
    started = time.time()
    try:
        interface = network_interface(cfg.spark)
        # Ranks run the executors' Python (spark.pyspark.python: a shipped ./environment/bin/python on a cluster)
        # and stream their output here, so that a cluster run shows its epochs on the driver.
        results = sorted(horovod.spark.run(rank_main, args=(job,), num_proc=cfg.train.num_proc, verbose=0,
                                           nics={interface} if interface else None,
                                           executable=os.environ.get("PYSPARK_PYTHON", sys.executable),
                                           stdout=sys.stdout, stderr=sys.stderr,
                                           prefix_output_with_timestamp=True), key=lambda r: r["rank"])
    except Exception as e:
        why = " ".join(str(e).split())  # Horovod's message names the failed rank on its later lines
        raise StageError(f"training failed ({type(e).__name__}: {why[:400]}; the ranks' output above says more); "
                         f"{out} is unchanged. The last epoch's checkpoint stays in {work} for "
                         f"`dmf train --resume`; a run without --resume removes it") from e
    seconds = time.time() - started
    chief = results[0]
    best = next(h for h in chief["history"] if h["epoch"] == chief["best_epoch"])
    with storage.publish(out, "train", force) as tmp:
        save(load(job["weights"]), f"{tmp}/model.pt")
        plot_history(chief["history"], f"{tmp}/learning_curves.png", spec.model)
        storage.write_manifest(tmp, {
            "stage": "train", "spec": spec.as_dict(), "train": vars(cfg.train),
            "data": {"path": data_dir, "dataset": data["dataset"], "created_at": data["created_at"],
                     "checksum": data["source"]["checksum"], "counts": data["counts"]},
            "ranks": [{key: r[key] for key in ("rank", "host", "gpus", "device", "rows", "local_rows")}
                      for r in results],
            "history": chief["history"], "seconds": seconds,
            "metrics": {"valid_rmse": best["valid_rmse"], "valid_mae": best["valid_mae"],
                        "best_epoch": chief["best_epoch"], "epochs_run": len(chief["history"]),
                        "valid_ndcg": chief["best_ndcg"], "k": cfg.evaluate.k,
                        "best_ranking_epoch": chief["best_ranking_epoch"] if chief["best_ndcg"] is not None else None}})
    fs, plain_work = storage.filesystem(work)
    fs.rm(plain_work, recursive=True)
    return storage.read_manifest(out, "train")


CHECKPOINT_FILES = ("checkpoint.pt", "best.pt")


def checkpoint_dir(out: str, resume: bool) -> str:
    """`<out>.checkpoint`, where rank 0 keeps the last epoch (for --resume) and the best weights; a run without
    --resume starts it afresh. Only a directory of checkpoint files is ever removed."""
    work = f"{out.rstrip('/')}.checkpoint"
    fs, plain = storage.filesystem(work)
    if fs.exists(plain) and not resume:
        names = {os.path.basename(p.rstrip("/")) for p in fs.ls(plain, detail=False)} if fs.isdir(plain) else {None}
        if not names <= {*CHECKPOINT_FILES, *(f"{n}{storage.PARTIAL}" for n in CHECKPOINT_FILES)}:
            raise StageError(f"{work} holds files that are not training checkpoints "
                             f"({', '.join(sorted(map(str, names)))}): "
                             f"refusing to remove it; move it away or choose another --out")
        fs.rm(plain, recursive=True)
    if resume and not fs.exists(f"{plain}/checkpoint.pt"):
        log.warning("train: --resume found no checkpoint in %s; starting from the first epoch", work)
    fs.makedirs(plain, exist_ok=True)
    return work




def plot_history(history: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax.plot(epochs, [h["valid_rmse"] for h in history], label="validation RMSE")
    if "valid_ndcg" in history[0]:
        ax.plot(epochs, [h["valid_ndcg"] for h in history], label="validation NDCG (ranking score)")
    ax.set_xlabel("epoch")
    ax.set_title(f"{title}: learning curves")
    ax.legend()
    fs, plain = storage.filesystem(path)
    with fs.open(plain, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def summary(manifest: dict, out: str) -> str:
    m = manifest["metrics"]
    start = f" (started from {manifest['train']['init_from']})" if manifest["train"].get("init_from") else ""
    ranked = (f"\n  ranking score: validation NDCG@{m['k']} {m['valid_ndcg']:.4f} (best epoch "
              f"{m['best_ranking_epoch']})" if m.get("valid_ndcg") is not None else "")
    return (f"trained {manifest['spec']['model']}{start} -> {out}\n  validation RMSE {m['valid_rmse']:.4f}, "
            f"MAE {m['valid_mae']:.4f} (best epoch {m['best_epoch']} of {m['epochs_run']}), "
            f"{manifest['seconds']:.0f} s on {len(manifest['ranks'])} ranks{ranked}")
