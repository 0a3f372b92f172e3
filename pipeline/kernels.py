"""Compiled (numba) loops for the hot paths of training on the CPU: summing a sparse gradient's rows, applying
Adagrad to the rows a step touched (pipeline.training.sparse), and mf's pair scores and their gradients
(pipeline.models.mf). Each walks its arrays once, where the torch ops they replace take several passes and
temporaries."""
from __future__ import annotations

import functools
import types

import numpy as np


@functools.cache
def compiled():
    """The compiled kernels, built on first use (numba caches them on disk), so that importing costs nothing.
    error_model="numpy": a float division needs no zero check, which keeps the inner loop vectorized. fastmath
    lets the mf kernels vectorize their sums over a row (in a fixed order still: the same run gives the same
    numbers); the README's training figures say what each choice saved."""
    import numba

    jit = numba.njit(cache=True, error_model="numpy")
    fast = numba.njit(cache=True, error_model="numpy", fastmath=True)
    return types.SimpleNamespace(sum_rows=jit(sum_rows), adagrad_rows=jit(adagrad_rows), mf_scores=fast(mf_scores),
                                 mf_gradients=fast(mf_gradients))


def sum_rows(indices, values, slot, sums, order):
    """Sums values[k] into sums[slot[r]] for r = indices[k], giving each new row the next place (order[place] = r).
    Returns the number of places used."""
    d = values.shape[1]
    seen = 0
    for k in range(len(indices)):
        r = indices[k]
        s = slot[r]
        if s < 0:
            slot[r] = seen
            order[seen] = r
            for j in range(d):  # explicit loops: numba's row slices were slower here
                sums[seen, j] = values[k, j]
            seen += 1
        else:
            for j in range(d):
                sums[s, j] += values[k, j]
    return seen


def adagrad_rows(weight, state, lr, eps, slot, sums):
    """For every row r with a place: state[r] += g * g and weight[r] -= lr * g / (sqrt(state[r]) + eps), g being
    sums[slot[r]]; then slot[r] = -1 again. Walks the table in row order, which reads it faster than in the
    order the rows came."""
    d = weight.shape[1]
    for r in range(weight.shape[0]):
        s = slot[r]
        if s < 0:
            continue
        slot[r] = -1
        for j in range(d):
            g = sums[s, j]
            total = state[r, j] + g * g
            state[r, j] = total
            weight[r, j] -= lr * (g / (np.sqrt(total) + eps))


def mf_scores(user_rows, item_rows, user_bias, item_bias, users, items, scores, row_norms, bias_norms):
    """For pair k of (users[k], items[k]), with p, q their rows and b_u, b_i their biases: scores[k] = <p, q> + b_u
    + b_i, row_norms[k] = |p|^2 + |q|^2 and bias_norms[k] = b_u^2 + b_i^2."""
    d = user_rows.shape[1]
    zero = scores.dtype.type(0)  # sums in the tables' precision, as torch's would be
    for k in range(len(users)):
        u, i = users[k], items[k]
        dot = norms = zero
        for j in range(d):
            p, q = user_rows[u, j], item_rows[i, j]
            dot += p * q
            norms += p * p + q * q
        scores[k] = dot + user_bias[u, 0] + item_bias[i, 0]
        row_norms[k] = norms
        bias_norms[k] = user_bias[u, 0] * user_bias[u, 0] + item_bias[i, 0] * item_bias[i, 0]


def mf_gradients(user_rows, item_rows, user_bias, item_bias, users, items, d_scores, d_row_norms, d_bias_norms,
                 d_user_rows, d_item_rows, d_user_bias, d_item_bias):
    """The backward of mf_scores, given the loss's derivatives by scores, row_norms and bias_norms: pair k's
    gradients by its user and item rows go to d_user_rows[k] and d_item_rows[k] (one per pair, as torch's sparse
    embedding backward gives them), by the biases they add into the dense d_user_bias and d_item_bias."""
    d = user_rows.shape[1]
    for k in range(len(users)):
        u, i = users[k], items[k]
        g, n = d_scores[k], d_row_norms[k] + d_row_norms[k]  # not 2 * x: an int times a float32 is a float64
        for j in range(d):
            p, q = user_rows[u, j], item_rows[i, j]
            d_user_rows[k, j] = g * q + n * p
            d_item_rows[k, j] = g * p + n * q
        b = d_bias_norms[k] + d_bias_norms[k]
        d_user_bias[u, 0] += g + b * user_bias[u, 0]
        d_item_bias[i, 0] += g + b * item_bias[i, 0]
