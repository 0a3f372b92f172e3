"""The training loop of one Horovod rank. It knows nothing of Spark or of how it was launched.

`rank_main(job)` is what every rank runs: read this rank's shard of train and valid through
petastorm, train in lockstep with the other ranks, validate on the sums of errors reduced across
ranks, keep the best epoch, and checkpoint every epoch so that a killed run can be resumed.
"""
from __future__ import annotations

import concurrent.futures
import copy
import math
import os
import socket
import time
import warnings

import numpy as np
import torch

from pipeline import metrics
from pipeline.artifacts import load, save
from pipeline.models import registry
from pipeline.models.history import rating_history
from pipeline.training import ranking, sparse

COLUMNS = ("user_idx", "item_idx", "rating")


def _no_stored_schema(dataset):
    from petastorm.etl.dataset_metadata import PetastormMetadataError

    raise PetastormMetadataError("dmf reads plain Parquet: a stored Unischema is never loaded")


def read_shard(url: str, rank: int, size: int) -> dict[str, np.ndarray]:
    """This rank's row groups, in a canonical order so that a run does not depend on read order."""
    from petastorm import make_batch_reader
    from petastorm.etl import dataset_metadata

    # petastorm unpickles a Unischema from _common_metadata when it finds one, and its unpickler lets
    # builtins such as exec through: anyone who can write into a data directory could run code on every
    # rank. prepare writes plain Parquet, whose schema petastorm infers when no Unischema is found, so the
    # loading is switched off (make_batch_reader and the Reader both reach it through this module global).
    dataset_metadata.get_schema = _no_stored_schema
    warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")
    parts = {c: [] for c in COLUMNS}
    with make_batch_reader(url, cur_shard=rank, shard_count=size, num_epochs=1, shuffle_row_groups=False,
                           reader_pool_type="dummy", schema_fields=list(COLUMNS)) as reader:
        for batch in reader:
            for c in COLUMNS:
                parts[c].append(getattr(batch, c))
    shard = {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}
    order = np.lexsort((shard["item_idx"], shard["user_idx"]))
    return {c: v[order] for c, v in shard.items()}


def to_tensors(shard: dict, device) -> tuple[torch.Tensor, ...]:
    return (torch.as_tensor(shard["user_idx"], dtype=torch.long, device=device),
            torch.as_tensor(shard["item_idx"], dtype=torch.long, device=device),
            torch.as_tensor(shard["rating"], dtype=torch.float32, device=device))



def make_optimizer(name: str, model, lr: float, weight_decay: float):
    # Weight decay on the dense layers only; embedding rows get the batch-wise L2 of the loss instead.
    tables = {id(p) for m in sparse.embedding_tables(model) for p in m.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) in tables], "weight_decay": 0.0},
              {"params": [p for p in model.parameters() if id(p) not in tables], "weight_decay": weight_decay}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adagrad":
        return sparse.Adagrad(groups, lr=lr)
    return torch.optim.Adam(groups, lr=lr)


def evaluate(model, users, items, ratings, batch: int = 65536) -> dict:
    model.eval()
    with torch.no_grad():
        preds = [model.predict(users[i:i + batch], items[i:i + batch]) for i in range(0, len(users), batch)]
    pred = torch.cat(preds).cpu().numpy() if preds else np.zeros(0)
    return metrics.error_sums(pred, ratings.cpu().numpy())




class Progress:
    """A one-line bar redrawn in place, for an interactive terminal only (the driver decides)."""

    def __init__(self, total: int, label: str, width: int = 30):
        self.total, self.label, self.width, self.started, self.drawn = total, label, width, time.time(), 0.0

    def update(self, done: int) -> None:
        now = time.time()
        if now - self.drawn < 0.2 and done < self.total:
            return
        self.drawn = now
        filled = self.width * done // self.total
        rate = done / max(now - self.started, 1e-9)
        print(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} steps"
              f"  ETA {(self.total - done) / rate:.0f}s", end="", flush=True)

    def close(self) -> None:
        print("\r\033[K", end="", flush=True)


def average_batch_norm_statistics(model: torch.nn.Module, hvd) -> None:
    """Batch norm's running statistics are buffers, not parameters: each rank's follow its own shard and
    no optimizer allreduces them. Averaged, every rank validates the same model that rank 0 saves."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for stat in ("running_mean", "running_var"):
                buffer = getattr(module, stat)
                buffer.copy_(hvd.allreduce(buffer, op=hvd.Average, name=f"{name}.{stat}"))


def draw_batches(seed: int, n_rows: int, steps: int, batch: int, in_shard_order: bool) -> torch.Tensor:
    """[steps, batch] positions in a shard of n_rows for one epoch: a seeded shuffle (repeated when the steps take
    more rows than the shard has) cut into batches."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n_rows, generator=gen, dtype=torch.int32)  # int32: faster, the same draws
                       for _ in range(math.ceil(steps * batch / n_rows))])
    order = order[:steps * batch].view(steps, batch)
    if in_shard_order:
        # Each batch's pairs in shard order (by user, then item): the shard and the tables are read and the rows
        # summed in row order, which is faster under sparse gradients. NumPy sorts faster than torch here. Dense
        # paths keep the order that their tuned results were measured with.
        order = torch.from_numpy(np.sort(order.numpy(), axis=1))
    return order



def rank_main(job: dict) -> dict:
    """Train one rank in lockstep with the others; rank 0 writes the checkpoints and the best weights."""
    import horovod.torch as hvd

    hvd.init()
    run = RankRun(job, hvd)
    run.restore()
    for epoch in range(run.state["epoch"], run.t.epochs):
        if run.stopped():  # a resumed run that had already stopped early
            break
        started = time.time()
        loss = run.train_epoch(epoch)
        train_seconds = time.time() - started
        record = {"epoch": epoch + 1, "train_loss": loss, **run.validate(),
                  "samples_per_s": run.steps * run.t.batch_size * run.size / train_seconds}
        record["seconds"] = time.time() - started
        run.keep_best(record)
        run.report(record)
        if run.stopped():
            if run.rank == 0:
                print(f"early stop: no better validation {run.watched()} for {run.state['bad_epochs']} epochs",
                      flush=True)
            break
    return run.finish()


def spark_gpus() -> list[str]:
    """The GPU addresses Spark assigned to this rank's task (spark.task.resource.gpu.amount); [] where none."""
    from horovod.spark.task import get_available_devices

    return list(get_available_devices())


def rank_device(gpus: list[str], local_rank: int) -> torch.device:
    """The GPU Spark assigned to the task, else (no GPU scheduling) the local_rank-th; the CPU without CUDA.
    Spark's address, not local_rank, is the one no other task on the host is using (horovod#3841)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if not gpus:
        return torch.device("cuda", local_rank)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")  # a cluster manager that isolates GPUs
    return torch.device("cuda", visible.index(gpus[0]) if gpus[0] in visible else int(gpus[0]))


class RankRun:
    """What one rank holds through training, set up in the constructor and used by the phases rank_main calls:
    restore, train_epoch, validate, keep_best, report, finish."""

    def __init__(self, job: dict, hvd):
        self.job, self.hvd, self.t = job, hvd, job["train"]
        self.rank, self.size = hvd.rank(), hvd.size()
        t = self.t
        torch.set_num_threads(t.threads_per_rank or max(1, (os.cpu_count() or 1) // hvd.local_size()))
        self.gpus = spark_gpus()
        self.device = rank_device(self.gpus, hvd.local_rank())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(t.seed)
        self.train = to_tensors(read_shard(job["train_url"], self.rank, self.size), self.device)
        self.valid = to_tensors(read_shard(job["valid_url"], self.rank, self.size), self.device)
        self.n_local = len(self.train[0])
        # Every rank learns of an empty shard, so that none waits for it in a collective.
        empty = hvd.allreduce(torch.tensor(int(self.n_local == 0)), op=hvd.Sum, name="empty_shards")
        if int(empty):
            raise RuntimeError(f"{int(empty)} of {self.size} ranks got no training rows from {job['train_url']}"
                               f" (this one {self.n_local:,})")
        self.model, self.in_history = self.build_model()
        # The softmax reads every ranking item row each step: a dense gradient.
        dense = (self.model.ranking_item,) if t.ranking_loss == "softmax" else ()
        self.exchange = sparse.Exchange(self.model, self.train[0], self.train[1], hvd, t.sparse_gradients, dense)
        self.lr = t.lr * (self.size if t.scale_lr else 1)
        optimizer = make_optimizer(t.optimizer, self.model, self.lr, t.weight_decay)
        self.optimizer = hvd.DistributedOptimizer(
            optimizer, named_parameters=self.model.named_parameters(),
            compression=hvd.Compression.fp16 if t.fp16_allreduce else hvd.Compression.none)
        self.ranking = self.ranking_validation = None
        if self.model.ranking_user is not None:
            self.ranking = ranking.objective(self.model, self.train, hvd, t, job["spec"], self.exchange)
            self.ranking_validation = ranking.Validation(hvd, self.train, self.valid, job["spec"].n_users,
                                                         job["relevant_rating"], job["k"], t.seed)
        n_total = int(hvd.allreduce(torch.tensor(float(self.n_local)), op=hvd.Sum).item())
        # Every rank takes the same number of steps so that the allreduces pair up, even when shards differ.
        self.steps = max(1, math.ceil(n_total / (t.batch_size * self.size)))
        self.drawing = concurrent.futures.ThreadPoolExecutor(1)  # the next epoch's batches, drawn during this one

    def build_model(self):
        """The model on this rank's device, and which of this rank's training rows its item history holds."""
        job, t = self.job, self.t
        genres = torch.as_tensor(job["item_genres"], dtype=torch.long) if job["item_genres"] is not None else None
        history, in_history = None, None  # without an item history no rating is left out of one
        spec = job["spec"]
        if spec.item_history:  # every rank needs every item's ratings, not only its shard's
            gathered = [self.hvd.allgather(column, name=f"history.{n}") for n, column in enumerate(self.train)]
            *history, kept = rating_history(*gathered, spec.n_items, spec.rating_levels, t.history_size, t.seed)
            sizes = self.hvd.allgather(torch.tensor([self.n_local]), name="history.sizes")
            mine = int(sizes[:self.rank].sum())  # allgather concatenates in rank order
            in_history = kept[mine:mine + self.n_local].to(self.device)
        return registry.build(spec, genres, history).to(self.device), in_history


    def restore(self) -> None:
        """From the checkpoint with --resume, else from train.init_from or the seeded initialisation; then every
        rank takes rank 0's parameters, optimizer state and progress. Only rank 0 keeps the best weights."""
        job, hvd = self.job, self.hvd
        self.state = {"epoch": 0, "history": [], "best_rmse": math.inf, "best_epoch": -1, "best_ndcg": -math.inf,
                      "best_ranking_epoch": -1, "bad_epochs": 0}
        self.best = {"model": None, "ranking": None}
        checkpoint = load(job["checkpoint"]) if job["resume"] and self.rank == 0 else None
        if checkpoint is not None and "best" not in checkpoint:
            raise RuntimeError(f"{job['checkpoint']} was written by an earlier version of dmf: train again without "
                               f"--resume")
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.state, self.best = checkpoint["state"], checkpoint["best"]
        elif self.rank == 0 and job["init"]:  # the other ranks get these values by the broadcast below
            start, params = load(job["init"]["weights"]), dict(self.model.named_parameters())
            with torch.no_grad():
                for name in job["init"]["names"]:
                    params[name].copy_(start[name])
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)
        self.state = hvd.broadcast_object(self.state, root_rank=0)
        self.started = time.time() - sum(h["seconds"] for h in self.state["history"])
        self.upcoming = self.draw(self.state["epoch"])

    def draw(self, epoch: int) -> concurrent.futures.Future:
        # Seeded by (seed, epoch, rank), so a resumed run draws exactly what an uninterrupted one would.
        return self.drawing.submit(draw_batches, self.t.seed * 1_000_003 + epoch * 1009 + self.rank, self.n_local,
                                   self.steps, self.t.batch_size, self.t.sparse_gradients)

    def train_epoch(self, epoch: int) -> float:
        """One epoch of steps; the mean training loss over every rank."""
        t, model, optimizer = self.t, self.model, self.optimizer
        model.train()
        for group in optimizer.param_groups:  # from the epoch alone, so that a resumed run decays the same
            group["lr"] = self.lr * t.lr_decay ** epoch
        torch.manual_seed(t.seed * 7919 + epoch * 31 + self.rank)  # dropout: seeded like the batches
        order = self.upcoming.result().to(self.device)
        self.upcoming = self.draw(epoch + 1)
        bias_l2 = t.l2 if t.bias_l2 is None else t.bias_l2
        loss_sum = torch.zeros((), device=self.device)
        show = self.job.get("progress") and self.rank == 0
        progress = Progress(self.steps, f"epoch {epoch + 1}/{t.epochs}") if show else None
        for step in range(self.steps):
            idx = order[step]
            u, i, r = (column.index_select(0, idx) for column in self.train)  # on the CPU faster than train[0][idx]
            optimizer.zero_grad()
            loss = model.loss(u, i, r, None if self.in_history is None else self.in_history[idx], t.l2, bias_l2)
            if model.rater_bag is not None and t.history_l2 > 0:
                loss = loss + t.history_l2 / self.steps * model.rater_bag.weight.pow(2).sum()
            if self.ranking is not None:
                loss = loss + self.ranking.loss(u, i, r, step)
            loss.backward()
            optimizer.synchronize()
            self.exchange.restore_local()
            with optimizer.skip_synchronize():
                optimizer.step()
            loss_sum += loss.detach()
            if progress:
                progress.update(step + 1)
        self.exchange.share(optimizer)
        if progress:
            progress.close()
        return self.hvd.allreduce(loss_sum / self.steps, op=self.hvd.Average).item()

    def validate(self) -> dict:
        """Validation RMSE and MAE over every rank's shard, and the ranking score's NDCG@k when there is one."""
        hvd = self.hvd
        average_batch_norm_statistics(self.model, hvd)
        sums = evaluate(self.model, *self.valid)
        reduced = hvd.allreduce(torch.tensor([sums["sse"], sums["sae"], sums["n"]], dtype=torch.float64), op=hvd.Sum)
        errors = metrics.rating_errors(dict(zip(("sse", "sae", "n"), reduced.tolist())))
        record = {"valid_rmse": errors["rmse"], "valid_mae": errors["mae"]}
        if self.ranking_validation is not None:
            record["valid_ndcg"] = self.ranking_validation.ndcg(self.model)
        return record

    def keep_best(self, record: dict) -> None:
        """The best epoch of each head: the rating parameters of the lowest RMSE and the ranking tables of the
        highest NDCG (rank 0 keeps copies). An epoch that improves neither counts towards train.patience."""
        state, improved = self.state, False
        weights = self.model.state_dict() if self.rank == 0 else None
        if record["valid_rmse"] < state["best_rmse"] - 1e-6:
            state.update(best_rmse=record["valid_rmse"], best_epoch=record["epoch"])
            self.best["model"] = copy.deepcopy(weights)
            improved = True
        if record.get("valid_ndcg", -math.inf) > state["best_ndcg"] + 1e-6:
            state.update(best_ndcg=record["valid_ndcg"], best_ranking_epoch=record["epoch"])
            self.best["ranking"] = self.model.ranking_state() if self.rank == 0 else None
            improved = True
        state["history"].append(record)
        state.update(epoch=record["epoch"], bad_epochs=0 if improved else state["bad_epochs"] + 1)

    def watched(self) -> str:
        return "RMSE or NDCG" if self.ranking is not None else "RMSE"

    def stopped(self) -> bool:
        return self.state["bad_epochs"] >= self.t.patience

    def report(self, record: dict) -> None:
        """Rank 0 prints the epoch's line and writes the checkpoint."""
        if self.rank != 0:
            return
        epochs, epoch = self.t.epochs, record["epoch"]
        elapsed = time.time() - self.started
        ndcg = f"  NDCG@{self.job['k']} {record['valid_ndcg']:.4f}" if "valid_ndcg" in record else ""
        print(f"epoch {epoch:3d}/{epochs}  loss {record['train_loss']:.4f}  valid RMSE {record['valid_rmse']:.4f}"
              f"  MAE {record['valid_mae']:.4f}{ndcg}  {record['samples_per_s']:,.0f} samples/s"
              f"  elapsed {elapsed:.0f}s  ETA {elapsed / epoch * (epochs - epoch):.0f}s", flush=True)
        save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "state": self.state,
              "best": self.best}, self.job["checkpoint"])

    def finish(self) -> dict:
        """Rank 0 writes the best weights: the best rating epoch's, with the best ranking epoch's ranking tables."""
        self.drawing.shutdown(wait=False, cancel_futures=True)
        if self.rank == 0:
            best = dict(self.best["model"] if self.best["model"] is not None else self.model.state_dict())
            best.update(self.best["ranking"] or {})
            save({k: v.cpu() for k, v in best.items()}, self.job["weights"])
        state = self.state
        return {"rank": self.rank, "host": socket.gethostname(), "gpus": self.gpus, "device": str(self.device),
                "rows": self.n_local, "local_rows": self.exchange.local_counts, "history": state["history"],
                "best_epoch": state["best_epoch"], "best_rmse": state["best_rmse"],
                "best_ranking_epoch": state["best_ranking_epoch"],
                "best_ndcg": state["best_ndcg"] if state["best_ranking_epoch"] > 0 else None}
