"""The sparse gradient exchange (train.sparse_gradients), in one place: which tables take sparse gradients, the
gradient hook that sums a batch's rows, the rows a rank keeps to itself, their share at an epoch's end, and the
Adagrad that applies sparse rows without a sort.

Embedding tables are nearly all the parameters. Under sparse gradients a table's gradient holds the rows of the
ranks' batches: `Rows.distinct`, a gradient hook, sums a batch's duplicates before Horovod allgathers them (the
same row once per rank that touched it), instead of allreducing whole tables. torch's Adagrad would first
coalesce it (sort the rows and sum the duplicates) and then take several passes over them; on 2 CPU ranks at
138K x 27K that was most of a step. Here one pass sums the duplicates into a scratch row each and a second applies
Adagrad to every row touched, in float32 as torch does. Dense gradients and GPU tensors go to torch's Adagrad.

Rows that one rank alone reads (its users' rows: prepare splits the shards by user) stay out of the exchange:
that rank applies them itself, and `Exchange.share` copies them and their Adagrad sums to the other ranks once an
epoch, so that every rank validates, and rank 0 saves, the same model. The arithmetic is that of the full exchange.
The config's rules (Adagrad only, no fp16 compression, no item history) are checked in pipeline.config.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.kernels import compiled


class Adagrad(torch.optim.Adagrad):
    def __init__(self, *args, **kwargs):  # torch's arguments: Horovod rebuilds the optimizer from its param_groups
        super().__init__(*args, **kwargs)
        self._rows: dict[torch.Tensor, Rows] = {}

    def __setstate__(self, state):  # a copy starts with fresh scratch arrays
        super().__setstate__(state)
        self._rows = {}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("this Adagrad takes no closure")
        sparse = [(p, group) for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.grad.is_sparse and p.device.type == "cpu"]
        if any(group["weight_decay"] or group["maximize"] for _, group in sparse):
            raise ValueError("sparse gradients take neither weight_decay nor maximize")
        applied = []
        try:
            for p, group in sparse:
                state = self.state[p]
                state["step"] += 1
                lr = float(group["lr"]) / (1 + (float(state["step"]) - 1) * group["lr_decay"])
                rows = self._rows.get(p)
                if rows is None:
                    rows = self._rows[p] = Rows(p)
                if p.grad.is_coalesced():  # each row once already: applied from the gradient itself
                    sums = rows.place(p.grad)
                else:
                    rows.add(p.grad)
                    sums = rows.sums
                weight = p.detach().numpy()
                compiled().adagrad_rows(weight, state["sum"].numpy(), weight.dtype.type(lr),
                                        weight.dtype.type(group["eps"]), rows.slot, sums)
                applied.append((p, p.grad))
                p.grad = None  # hidden from torch's step below, which would apply it again
            return super().step()
        finally:
            for p, grad in applied:
                p.grad = grad


class Rows:
    """Sums a sparse gradient's rows by row, in scratch arrays kept between steps: fresh ones would cost more
    in page faults than the kernels do in arithmetic. `slot[r]` is row r's place in `sums` (-1: none).

    `local` (optional, a bool per row) marks the rows that no other rank reads: a user's row when the shards are
    split by user, as prepare writes them. Their gradients need not be exchanged: `distinct` keeps them back, and
    `with_local` adds them to the exchanged gradient, divided by the number of ranks as Horovod's average divides
    the others. The other ranks' copies of these rows go stale until `Exchange.share` copies them from their
    rank."""

    def __init__(self, table: torch.Tensor, local: np.ndarray | None = None, ranks: int = 1):
        self.slot = np.full(table.shape[0], -1, dtype=np.int64)
        self.sums = np.empty((0, table.shape[1]), torch.empty(0, dtype=table.dtype).numpy().dtype)
        self.order = np.empty(0, dtype=np.int64)  # the rows, in the order of their places
        self.local, self.ranks, self.kept = local, ranks, None

    def add(self, grad: torch.Tensor) -> int:
        """Sums grad's values by row into `sums` and `slot`; returns the number of distinct rows."""
        indices, values = grad._indices()[0].contiguous().numpy(), grad._values().contiguous().numpy()
        if len(self.order) < len(indices):
            self.sums = np.empty((len(indices), self.sums.shape[1]), self.sums.dtype)
            self.order = np.empty(len(indices), dtype=np.int64)
        return compiled().sum_rows(indices, values, self.slot, self.sums, self.order)

    def place(self, grad: torch.Tensor) -> np.ndarray:
        """For a gradient that holds each row once (coalesced): each row's place is its position in it. Returns
        its values, which the places point into."""
        indices = grad._indices()[0].numpy()
        self.slot[indices] = np.arange(len(indices))
        return grad._values().numpy()

    def distinct(self, grad: torch.Tensor) -> torch.Tensor | None:
        """A gradient hook: the same sparse gradient with each row once, less the local rows. A batch looks up
        popular items many times; summed first, the ranks exchange and apply each row once (a 32,768-pair batch
        on 138K x 27K tables touches 24.8K users and 9.6K items)."""
        if not grad.is_sparse or grad.device.type != "cpu":
            return None
        coalesced = grad.is_coalesced()  # each row once, in order (ranking.CompiledAllPairs gives them so)
        if coalesced:
            if self.local is None:
                return None
            rows, sums = grad._indices()[0].numpy(), grad._values().numpy()
        else:
            seen = self.add(grad)
            rows, sums = self.order[:seen], self.sums[:seen]
            self.slot[rows] = -1
        if self.local is None:
            rows, sums = rows.copy(), sums.copy()
        else:
            local = self.local[rows]
            self.kept = (rows[local], sums[local] / sums.dtype.type(self.ranks), coalesced)
            rows, sums = rows[~local], sums[~local]
        return torch.sparse_coo_tensor(torch.from_numpy(rows)[None], torch.from_numpy(sums), grad.shape,
                                       check_invariants=False)  # valid by construction

    def with_local(self, grad: torch.Tensor) -> torch.Tensor:
        """The exchanged gradient plus the local rows that `distinct` kept back from it."""
        if self.kept is None:
            return grad
        rows, sums, coalesced = self.kept
        self.kept = None
        if coalesced and grad._nnz() == 0:  # nothing came from the exchange: the local rows, still each once in order
            return torch.sparse_coo_tensor(torch.from_numpy(rows)[None], torch.from_numpy(sums), grad.shape,
                                           check_invariants=False, is_coalesced=True)
        return torch.sparse_coo_tensor(torch.cat([grad._indices()[0], torch.from_numpy(rows)])[None],
                                       torch.cat([grad._values(), torch.from_numpy(sums)]), grad.shape,
                                       check_invariants=False)


class Exchange:
    """The sparse exchange of one rank's model, set up before the optimizer is wrapped: `restore_local` after the
    gradients are synchronized and before the step, `share` at the end of an epoch. Tables in `dense` (and biases,
    one column wide: as sparse they were no faster) keep dense gradients; without `enabled` every table does."""

    def __init__(self, model: torch.nn.Module, users: torch.Tensor, items: torch.Tensor, hvd, enabled: bool,
                 dense: tuple = ()):
        self.hvd = hvd
        self.local_rows = []  # (table weight, its Rows, every rank's local rows)
        self.local_counts = {}  # table name: how many of its rows this rank keeps out of the exchange
        user_tables, item_tables = model.indexed_tables()
        read_by = {id(t): users for t in user_tables} | {id(t): items for t in item_tables}
        names = {id(module): name for name, module in model.named_modules()}
        for table in embedding_tables(model):
            table.sparse = enabled and table.embedding_dim > 1 and not any(table is d for d in dense)
            if not (table.sparse and table.weight.device.type == "cpu"):  # on a GPU torch sums the rows itself
                continue
            if id(table) in read_by:
                name = names[id(table)]
                local, everyones = local_rows_of(hvd, table.num_embeddings, read_by[id(table)], f"{name}.readers")
                rows = Rows(table.weight, local, hvd.size())
                self.local_rows.append((table.weight, rows, everyones))
                self.local_counts[name] = int(local.sum())
            else:
                rows = Rows(table.weight)
            table.weight.register_hook(rows.distinct)

    def local_of(self, table: torch.nn.Embedding) -> tuple[np.ndarray | None, torch.Tensor | None]:
        """(which rows of the table only this rank reads, every rank's such rows), or (None, None)."""
        for weight, rows, everyones in self.local_rows:
            if weight is table.weight:
                return rows.local, everyones
        return None, None

    def restore_local(self) -> None:
        """Puts the local rows that the gradient hook kept back into the synchronized gradients."""
        for weight, rows, _ in self.local_rows:
            weight.grad = rows.with_local(weight.grad)

    def share(self, optimizer) -> None:
        """Local rows are updated by the one rank that reads them; this copies them and their optimizer state from
        that rank to the others."""
        with torch.no_grad():
            for n, (weight, rows, everyones) in enumerate(self.local_rows):
                mine = torch.from_numpy(rows.local)
                state = [v for v in optimizer.state[weight].values()
                         if torch.is_tensor(v) and v.shape == weight.shape]
                for k, tensor in enumerate([weight, *state]):
                    tensor[everyones] = self.hvd.allgather(tensor[mine], name=f"local_rows.{n}.{k}")


def embedding_tables(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]


def local_rows_of(hvd, n_rows: int, indices: torch.Tensor, name: str) -> tuple[np.ndarray, torch.Tensor]:
    """(for each row, whether this rank's shard reads it and no other's does; every rank's such rows, in rank
    order): the local rows of Rows."""
    here = torch.zeros(n_rows, dtype=torch.int32)
    here[indices] = 1
    local = (here == 1) & (hvd.allreduce(here, op=hvd.Sum, name=name) == 1)
    return local.numpy(), hvd.allgather(local.nonzero().squeeze(1), name=f"{name}.local")
