"""The item history's data: each item's raters and the level each gave, as the model's item side feature holds
them (see base.RatingModel.history_of)."""
from __future__ import annotations

import torch


def level_index(ratings: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest rating level (a tie goes to the lower level)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(ratings.to(levels.dtype), midpoints)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """An integer hash to 31 bits (the xor-shift-multiply rounds of a finalizer), in int64 without overflow."""
    x = x & 0x7FFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0x7FFFFFFF
    x = ((x ^ (x >> 12)) * 0x297A2D39) & 0x7FFFFFFF
    return x ^ (x >> 15)


def rating_history(users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, n_items: int,
                   levels: list[float], limit: int = 0,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets [n_items + 1], raters, kept): item i's raters are raters[offsets[i]:offsets[i + 1]], each user
    u who gave level l written as u * len(levels) + l; kept[row] tells whether input row `row` is among them.
    With `limit` > 0 an item keeps at most that many raters, a sample drawn by a seeded hash of (user, item):
    the same ratings in any order, on any number of ranks, give the same history."""
    users, items = users.long().cpu(), items.long().cpu()
    raters = users * len(levels) + level_index(ratings.cpu(), torch.tensor([float(x) for x in levels]))
    draw = _mix(_mix(items + _mix(torch.tensor(seed))) + users)
    order = torch.arange(len(items))
    for key in (raters, draw, items):  # by item, then draw, then rater: a stable sort per key, last key first
        order = order[torch.argsort(key[order], stable=True)]
    counts = torch.bincount(items, minlength=n_items)
    starts = torch.cumsum(counts, 0) - counts
    place = torch.empty_like(order)
    place[order] = torch.arange(len(order))
    kept = (place - starts[items] < limit) if limit > 0 else torch.ones(len(items), dtype=torch.bool)
    kept_counts = counts.clamp(max=limit) if limit > 0 else counts
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(kept_counts, 0)])
    chosen = order[kept[order]]
    return offsets, raters[chosen], kept
