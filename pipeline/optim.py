"""Adagrad whose sparse gradients on the CPU are applied by one compiled kernel, without a sort.

Under train.sparse_gradients an embedding table's gradient holds one row per pair of the ranks' batches,
duplicates included. torch's Adagrad first coalesces it (sorts the rows and sums the duplicates) and then
takes several passes over them; on 2 CPU ranks at 138K x 27K that was most of a step. Here one pass sums the
duplicates into a scratch row each and a second applies Adagrad to every row touched: the same arithmetic, so
the same result to float rounding. Dense gradients and GPU tensors go to torch's Adagrad.
"""
from __future__ import annotations

import numpy as np
import torch


class Adagrad(torch.optim.Adagrad):
    def __init__(self, *args, **kwargs):  # torch's arguments: Horovod rebuilds the optimizer from its param_groups
        super().__init__(*args, **kwargs)
        self._scratch: dict[torch.Tensor, tuple] = {}  # per table, kept between steps: see adagrad_rows

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("this Adagrad takes no closure")
        applied = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not p.grad.is_sparse or p.device.type != "cpu":
                    continue
                if group["weight_decay"] or group["lr_decay"]:
                    raise ValueError("sparse gradients take neither weight_decay nor lr_decay")
                state = self.state[p]
                state["step"] += 1
                grad = p.grad
                indices, values = grad._indices()[0].contiguous().numpy(), grad._values().contiguous().numpy()
                _adagrad_rows()(p.detach().numpy(), state["sum"].numpy(), indices, values, group["lr"], group["eps"],
                                *self.scratch(p, len(indices)))
                applied.append((p, grad))
                p.grad = None  # hidden from torch's step below, which would apply it again
        try:
            return super().step()
        finally:
            for p, grad in applied:
                p.grad = grad

    def scratch(self, table: torch.Tensor, rows: int) -> tuple:
        """(slot, scratch) for a step of this many gradient rows, reused while they fit: fresh arrays cost more
        in page faults than the kernel does in arithmetic."""
        kept = self._scratch.get(table)
        if kept is None or len(kept[1]) < rows:
            slot = kept[0] if kept else np.full(table.shape[0], -1, dtype=np.int64)
            kept = (slot, np.empty((rows, table.shape[1]), table.detach().numpy().dtype))
            self._scratch[table] = kept
        return kept


_compiled = None


def _adagrad_rows():
    """The compiled kernel, built on first use (numba caches it on disk) so that importing costs nothing."""
    global _compiled
    if _compiled is None:
        import numba

        # error_model="numpy": a float division needs no zero check, which keeps the inner loop vectorized.
        _compiled = numba.njit(cache=True, error_model="numpy")(adagrad_rows)
    return _compiled


def adagrad_rows(weight, sums, indices, values, lr, eps, slot, scratch):
    """weight[r] -= lr * g / (sqrt(sums[r]) + eps) after sums[r] += g * g, for every row r in `indices`, g being
    the sum of that row's `values`. The first pass sums each row's values into scratch[slot[r]]; the second
    walks the table in row order, which reads it faster than in the order the rows came. `slot` holds -1 for
    every row before and after."""
    d = weight.shape[1]
    seen = 0
    for k in range(len(indices)):
        r = indices[k]
        if slot[r] < 0:
            slot[r] = seen
            scratch[seen] = values[k]
            seen += 1
        else:
            scratch[slot[r]] += values[k]
    for r in range(weight.shape[0]):
        s = slot[r]
        if s < 0:
            continue
        slot[r] = -1
        for j in range(d):
            g = scratch[s, j]
            total = sums[r, j] + g * g
            sums[r, j] = total
            weight[r, j] -= lr * (g / (np.sqrt(total) + eps))
