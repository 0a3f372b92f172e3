"""Compiled (numba) loops for the hot paths of training on the CPU: summing a sparse gradient's rows, applying
Adagrad to the rows a step touched (pipeline.training.sparse), mf's pair scores and their gradients
(pipeline.models.mf), and the ranking objective's loss with its gradients by distinct row
(pipeline.training.ranking); and for scoring, each user's rated items in the order rated (pipeline.artifacts).
Each walks its arrays once, where the torch ops they replace take several passes and temporaries."""
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
                                 mf_gradients=fast(mf_gradients), distinct_rows=jit(distinct_rows),
                                 gram_rows=fast(gram_rows), pick_rows=fast(pick_rows), order_runs=jit(order_runs))


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


def distinct_rows(indices, marks, rows, multiplicity, places):
    """The distinct values of indices in ascending order into rows[:m], how often each comes into multiplicity[:m],
    and indices[k]'s place among them into places[k]; returns m. marks is a table-sized scratch of zeros, left
    zero: a count per row, then the row's place."""
    for k in range(len(indices)):
        marks[indices[k]] += 1
    m = 0
    for r in range(len(marks)):  # a scan of the table: sorted rows without a sort
        if marks[r]:
            rows[m] = r
            multiplicity[m] = marks[r]
            marks[r] = m
            m += 1
    for k in range(len(indices)):
        places[k] = marks[indices[k]]
    for j in range(m):
        marks[rows[j]] = 0
    return m


def gram_rows(vectors, rows, multiplicity, products, share, l2, scale, grads):
    """The all-pairs and L2 terms of a batch's distinct rows: row r = rows[j], x = vectors[j] its vector, k =
    multiplicity[j] how often the batch has it and p = products[j] its product with the other side's Gram matrix G,
    charges k (share[r] x^T G x + l2[r] |x|^2) (its share of the all-pairs sum and its L2 per appearance, as often
    as the batch has it); grads[j] is set to scale times that charge's gradient, 2 k (share[r] p + l2[r] x). Returns
    the charges' sum (in float64)."""
    d = vectors.shape[1]
    zero, total = vectors.dtype.type(0), 0.0  # sums in the tables' precision, as torch's would be; the total in float64
    two = scale + scale  # not 2 * scale: an int times a float32 is a float64
    for j in range(len(rows)):
        r = rows[j]
        k = vectors.dtype.type(multiplicity[j])
        a, b = k * share[r], k * l2[r]
        charge = zero
        for c in range(d):
            x = vectors[j, c]
            g = a * products[j, c] + b * x
            charge += x * g
            grads[j, c] = two * g
        total += charge
    return total


def pick_rows(items, user_vectors, item_vectors, user_places, item_places, ratings, every, above, confidence,
              item_weight, scale, user_grads, item_grads):
    """The pairs' own terms: pair k, of item i = items[k], its user's vector x = user_vectors[user_places[k]] and
    the item's y = item_vectors[item_places[k]], with s = <x, y> charges c (s - 1)^2 - w s^2 when it is a pick (every
    rating is when `every`, else a rating > above) and nothing otherwise, c = 1 + confidence x its rating and w =
    item_weight[i] the item's unpicked weight (the all-pairs term counted this pair as unpicked: that is taken
    off). Adds scale times the charge's gradients by x and y to user_grads[user_places[k]] and
    item_grads[item_places[k]]; returns the charges' sum (in float64)."""
    d = user_vectors.shape[1]
    zero, one, total = user_vectors.dtype.type(0), user_vectors.dtype.type(1), 0.0
    for k in range(len(items)):
        rating = ratings[k]
        if not (every or rating > above):
            continue
        pu, pi = user_places[k], item_places[k]
        s = zero
        for e in range(d):
            s += user_vectors[pu, e] * item_vectors[pi, e]
        c, w = one + confidence * rating, item_weight[items[k]]
        total += c * (s - one) * (s - one) - w * s * s
        g = scale * (c * (s - one) - w * s)
        g = g + g
        for e in range(d):
            user_grads[pu, e] += g * item_vectors[pi, e]
            item_grads[pi, e] += g * user_vectors[pu, e]
    return total


def order_runs(offsets, times, items):
    """Sorts each run items[offsets[r]:offsets[r + 1]] by its times (the same positions of `times`), then by item,
    in place. Run by run, the runs being short: one np.lexsort over 18M ratings took 13 s, this 1 s."""
    for r in range(len(offsets) - 1):
        start, end = offsets[r], offsets[r + 1]
        if end - start < 2:
            continue
        run = items[start:end].copy()
        by_item = np.argsort(run, kind="mergesort")  # stable: the time sort below keeps ties in item order
        order = by_item[np.argsort(times[start:end][by_item], kind="mergesort")]
        items[start:end] = run[order]
