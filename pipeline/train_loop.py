"""The training loop of one Horovod rank. It knows nothing of Spark or of how it was launched.

`rank_main(job)` is what every rank runs: read this rank's shard of train and valid through
petastorm, train in lockstep with the other ranks, validate on the sums of errors reduced across
ranks, keep the best epoch, and checkpoint every epoch so that a killed run can be resumed.
"""
from __future__ import annotations

import concurrent.futures
import copy
import io
import math
import os
import time
import warnings

import numpy as np
import torch

from pipeline import metrics, models, optim
from pipeline.storage import filesystem

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


def embedding_tables(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]


def make_optimizer(name: str, model, lr: float, weight_decay: float):
    # Weight decay on the dense layers only; embedding rows get the batch-wise L2 of the loss instead.
    tables = {id(p) for m in embedding_tables(model) for p in m.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) in tables], "weight_decay": 0.0},
              {"params": [p for p in model.parameters() if id(p) not in tables], "weight_decay": weight_decay}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adagrad":
        return optim.Adagrad(groups, lr=lr)
    return torch.optim.Adam(groups, lr=lr)


def evaluate(model, users, items, ratings, batch: int = 65536) -> dict:
    model.eval()
    with torch.no_grad():
        preds = [model.predict(users[i:i + batch], items[i:i + batch]) for i in range(0, len(users), batch)]
    pred = torch.cat(preds).cpu().numpy() if preds else np.zeros(0)
    return metrics.error_sums(pred, ratings.cpu().numpy())


def save(obj, path: str) -> None:
    """torch.save through fsspec, written to a temporary name first so a kill never leaves half a file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fs, plain = filesystem(path)
    with fs.open(plain + ".partial", "wb") as f:
        f.write(buffer.getvalue())
    fs.mv(plain + ".partial", plain)


def load(path: str):
    fs, plain = filesystem(path)
    if not fs.exists(plain):
        return None
    with fs.open(plain, "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)


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
    order = torch.cat([torch.randperm(n_rows, generator=gen, dtype=torch.int32)  # int32: 20% faster, same draws
                       for _ in range(math.ceil(steps * batch / n_rows))])
    order = order[:steps * batch].view(steps, batch)
    if in_shard_order:
        # Each batch's pairs in shard order (by user, then item): the shard and the tables are read and the rows
        # summed in row order (2-rank sparse steps at 138K x 27K took 9% less time). NumPy sorts 4x as fast as
        # torch here. Dense paths keep the order that their tuned results were measured with.
        order = torch.from_numpy(np.sort(order.numpy(), axis=1))
    return order


def local_rows_of(hvd, n_rows: int, indices: torch.Tensor, name: str) -> tuple[np.ndarray, torch.Tensor]:
    """(for each row, whether this rank's shard reads it and no other's does; every rank's such rows, in rank
    order): the local rows of optim.Rows."""
    here = torch.zeros(n_rows, dtype=torch.int32)
    here[indices] = 1
    local = (here == 1) & (hvd.allreduce(here, op=hvd.Sum, name=name) == 1)
    return local.numpy(), hvd.allgather(local.nonzero().squeeze(1), name=f"{name}.local")


def share_local_rows(local_rows: list, optimizer, hvd) -> None:
    """Local rows are updated by the one rank that reads them; this copies them and their optimizer state from that
    rank to the others, so that every rank validates, and rank 0 saves, the same model."""
    with torch.no_grad():
        for n, (weight, rows, everyones) in enumerate(local_rows):
            mine = torch.from_numpy(rows.local)
            state = [v for v in optimizer.state[weight].values() if torch.is_tensor(v) and v.shape == weight.shape]
            for k, tensor in enumerate([weight, *state]):
                tensor[everyones] = hvd.allgather(tensor[mine], name=f"local_rows.{n}.{k}")


def rank_main(job: dict) -> dict:
    import horovod.torch as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    t = job["train"]
    torch.set_num_threads(t["threads_per_rank"] or max(1, (os.cpu_count() or 1) // size))
    device = torch.device("cuda", hvd.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(t["seed"])

    train = to_tensors(read_shard(job["train_url"], rank, size), device)
    valid = to_tensors(read_shard(job["valid_url"], rank, size), device)
    genres = torch.as_tensor(job["item_genres"], dtype=torch.long) if job["item_genres"] is not None else None
    history, in_history = None, None  # without an item history no rating is left out of one
    if job["spec"].get("item_history"):  # every rank needs every item's ratings, not only its shard's
        gathered = [hvd.allgather(column, name=f"history.{n}") for n, column in enumerate(train)]
        *history, kept = models.rating_history(*gathered, job["spec"]["n_items"], job["spec"]["rating_levels"],
                                               t["history_size"], t["seed"])
        sizes = hvd.allgather(torch.tensor([len(train[0])]), name="history.sizes")
        mine = int(sizes[:rank].sum())  # allgather concatenates in rank order
        in_history = kept[mine:mine + len(train[0])].to(device)
    model = models.build(job["spec"], genres, history).to(device)
    user_tables, item_tables = model.tables()
    read_by_shard = {id(table): column for tables, column in ((user_tables, train[0]), (item_tables, train[1]))
                     for table in tables}
    local_rows = []  # (table weight, its optim.Rows, every rank's local rows)
    local_counts = {}  # table name: how many of its rows this rank keeps out of the exchange
    names = {id(module): name for name, module in model.named_modules()}
    for table in embedding_tables(model):
        # Sparse gradients hold only the rows a batch touched, each once (on the CPU a hook sums a row's
        # duplicates); Horovod allgathers them instead of allreducing whole tables, and the optimizer updates
        # only those rows. Bias tables (one column) stay dense: as sparse they were no faster (mf at 138K x
        # 27K, 2 CPU ranks, alternated: 793-897K samples/s against 831-1,044K dense).
        table.sparse = t["sparse_gradients"] and table.embedding_dim > 1
        if table.sparse and device.type == "cpu":
            if id(table) in read_by_shard:
                # prepare splits the shards by user, so no rank exchanges its users' rows
                name = names[id(table)]
                local, everyones = local_rows_of(hvd, table.num_embeddings, read_by_shard[id(table)], f"{name}.readers")
                rows = optim.Rows(table.weight, local, size)
                local_rows.append((table.weight, rows, everyones))
                local_counts[name] = int(local.sum())
            else:
                rows = optim.Rows(table.weight)
            table.weight.register_hook(rows.distinct)
    lr = t["lr"] * (size if t["scale_lr"] else 1)
    optimizer = make_optimizer(t["optimizer"], model, lr, t["weight_decay"])
    optimizer = hvd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if t["fp16_allreduce"] else hvd.Compression.none)

    state = {"epoch": 0, "history": [], "best_rmse": math.inf, "best_epoch": -1, "best_model": None}
    checkpoint = load(job["checkpoint"]) if job["resume"] and rank == 0 else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
    elif rank == 0 and job["init"]:  # train.init_from: the other ranks get these values by the broadcast below
        start, params = load(job["init"]["weights"]), dict(model.named_parameters())
        with torch.no_grad():
            for name in job["init"]["names"]:
                params[name].copy_(start[name])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    best_model = state.pop("best_model")  # only rank 0 keeps the best weights
    state = hvd.broadcast_object(state, root_rank=0)
    state["best_model"] = best_model

    bias_l2 = t["l2"] if t["bias_l2"] is None else t["bias_l2"]
    n_local = len(train[0])
    if n_local == 0:
        raise RuntimeError(f"rank {rank} of {size} got no training rows from {job['train_url']}")
    n_total = int(hvd.allreduce(torch.tensor(float(n_local)), op=hvd.Sum).item())
    batch = t["batch_size"]
    # Every rank takes the same number of steps so that the allreduces pair up, even when shards differ.
    steps = max(1, math.ceil(n_total / (batch * size)))
    started = time.time() - sum(h["seconds"] for h in state["history"])
    bad_epochs = state.get("bad_epochs", 0)

    drawing = concurrent.futures.ThreadPoolExecutor(1)  # the next epoch's batches are drawn while this one trains

    def draw(epoch: int) -> concurrent.futures.Future:
        # Seeded by (seed, epoch, rank), so a resumed run draws exactly what an uninterrupted one would.
        return drawing.submit(draw_batches, t["seed"] * 1_000_003 + epoch * 1009 + rank, n_local, steps, batch,
                              t["sparse_gradients"])

    upcoming = draw(state["epoch"])
    for epoch in range(state["epoch"], t["epochs"]):
        if bad_epochs >= t["patience"]:  # a resumed run that had already stopped early
            break
        epoch_start = time.time()
        model.train()
        for group in optimizer.param_groups:  # from the epoch alone, so that a resumed run decays the same
            group["lr"] = lr * t["lr_decay"] ** epoch
        torch.manual_seed(t["seed"] * 7919 + epoch * 31 + rank)  # dropout: seeded like the batches
        order = upcoming.result().to(device)
        upcoming = draw(epoch + 1)
        loss_sum = torch.zeros((), device=device)
        progress = Progress(steps, f"epoch {epoch + 1}/{t['epochs']}") if job.get("progress") and rank == 0 else None
        for step in range(steps):
            idx = order[step]
            u, i, r = (column.index_select(0, idx) for column in train)  # on the CPU twice as fast as train[0][idx]
            optimizer.zero_grad()
            loss = model.loss(u, i, r, None if in_history is None else in_history[idx], t["l2"], bias_l2)
            if model.rater_bag is not None and t["history_l2"] > 0:
                loss = loss + t["history_l2"] / steps * model.rater_bag.weight.pow(2).sum()
            loss.backward()
            optimizer.synchronize()
            for weight, rows, _ in local_rows:
                weight.grad = rows.with_local(weight.grad)
            with optimizer.skip_synchronize():
                optimizer.step()
            loss_sum += loss.detach()
            if progress:
                progress.update(step + 1)
        share_local_rows(local_rows, optimizer, hvd)
        train_seconds = time.time() - epoch_start
        if progress:
            progress.close()
        train_loss = hvd.allreduce(loss_sum / steps, op=hvd.Average).item()
        average_batch_norm_statistics(model, hvd)
        sums = evaluate(model, *valid)
        reduced = hvd.allreduce(torch.tensor([sums["sse"], sums["sae"], sums["n"]], dtype=torch.float64), op=hvd.Sum)
        errors = metrics.rating_errors(dict(zip(("sse", "sae", "n"), reduced.tolist())))
        seconds = time.time() - epoch_start
        record = {"epoch": epoch + 1, "train_loss": train_loss, "valid_rmse": errors["rmse"],
                  "valid_mae": errors["mae"], "samples_per_s": steps * batch * size / train_seconds, "seconds": seconds}
        state["history"].append(record)
        if errors["rmse"] < state["best_rmse"] - 1e-6:
            state.update(best_rmse=errors["rmse"], best_epoch=epoch + 1,
                         best_model=copy.deepcopy(model.state_dict()) if rank == 0 else None)
            bad_epochs = 0
        else:
            bad_epochs += 1
        state.update(epoch=epoch + 1, bad_epochs=bad_epochs)
        if rank == 0:
            elapsed = time.time() - started
            remaining = elapsed / (epoch + 1) * (t["epochs"] - epoch - 1)
            print(f"epoch {epoch + 1:3d}/{t['epochs']}  loss {train_loss:.4f}  valid RMSE {errors['rmse']:.4f}"
                  f"  MAE {errors['mae']:.4f}  {record['samples_per_s']:,.0f} samples/s"
                  f"  elapsed {elapsed:.0f}s  ETA {remaining:.0f}s", flush=True)
            save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
                 job["checkpoint"])
        if bad_epochs >= t["patience"]:
            if rank == 0:
                print(f"early stop: no better validation RMSE for {bad_epochs} epochs", flush=True)
            break

    drawing.shutdown(wait=False, cancel_futures=True)
    if rank == 0:
        best = state["best_model"] if state["best_model"] is not None else model.state_dict()
        save({k: v.cpu() for k, v in best.items()}, job["weights"])
    return {"rank": rank, "rows": n_local, "local_rows": local_counts, "history": state["history"],
            "best_epoch": state["best_epoch"], "best_rmse": state["best_rmse"]}
