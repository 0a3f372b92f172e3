"""Adagrad whose sparse gradients on the CPU are applied by compiled kernels, without a sort.

Under train.sparse_gradients an embedding table's gradient holds the rows of the ranks' batches, the same row
once per rank that touched it (`Rows.distinct`, a gradient hook, sums a batch's duplicates before the ranks
exchange them). torch's Adagrad first coalesces it (sorts the rows and sums the duplicates) and then takes
several passes over them; on 2 CPU ranks at 138K x 27K that was most of a step. Here one pass sums the
duplicates into a scratch row each and a second applies Adagrad to every row touched, in float32 as torch does.
Dense gradients and GPU tensors go to torch's Adagrad.
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
                rows.add(p.grad)
                weight = p.detach().numpy()
                compiled().adagrad_rows(weight, state["sum"].numpy(), weight.dtype.type(lr),
                                        weight.dtype.type(group["eps"]), rows.slot, rows.sums)
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
    the others. The other ranks' copies of these rows go stale until `share_local_rows` copies them
    from their rank."""

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

    def distinct(self, grad: torch.Tensor) -> torch.Tensor | None:
        """A gradient hook: the same sparse gradient with each row once, less the local rows. A batch looks up
        popular items many times; summed first, the ranks exchange and apply each row once (a 32,768-pair batch
        on 138K x 27K tables touches 24.8K users and 9.6K items)."""
        if not grad.is_sparse or grad.device.type != "cpu":
            return None
        seen = self.add(grad)
        rows, sums = self.order[:seen], self.sums[:seen]
        self.slot[rows] = -1
        if self.local is None:
            rows, sums = rows.copy(), sums.copy()
        else:
            local = self.local[rows]
            self.kept = (rows[local], sums[local] / sums.dtype.type(self.ranks))
            rows, sums = rows[~local], sums[~local]
        return torch.sparse_coo_tensor(torch.from_numpy(rows)[None], torch.from_numpy(sums), grad.shape,
                                       check_invariants=False)  # valid by construction

    def with_local(self, grad: torch.Tensor) -> torch.Tensor:
        """The exchanged gradient plus the local rows that `distinct` kept back from it."""
        if self.kept is None:
            return grad
        rows, sums = self.kept
        self.kept = None
        return torch.sparse_coo_tensor(torch.cat([grad._indices()[0], torch.from_numpy(rows)])[None],
                                       torch.cat([grad._values(), torch.from_numpy(sums)]), grad.shape,
                                       check_invariants=False)
