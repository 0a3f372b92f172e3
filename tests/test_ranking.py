"""The ranking objective's batch loss against the whole objective written out over every user x item pair."""
import dataclasses

import numpy as np
import pytest
import torch

from pipeline.models import registry
from pipeline.models.spec import ModelSpec
from pipeline.training import ranking


class OneRank:
    """Horovod's collectives as one rank sees them when it is the only one."""
    Sum = "sum"

    def rank(self):
        return 0

    def size(self):
        return 1

    def allreduce(self, tensor, op=None, name=None):
        return tensor.clone()

    def allgather(self, tensor, name=None):
        return tensor.clone()


def spec(n_users, n_items, dim=4):
    return ModelSpec(model="mf", n_users=n_users, n_items=n_items, user_dim=3, item_dim=3, hidden=[], dropout=0.0,
                     batch_norm=False, head="regression", rating_levels=[1, 2, 3, 4, 5], global_mean=3.0, n_genres=0,
                     max_genres=0, ranking_dim=dim)


def ratings(seed=0, n_users=7, n_items=9):
    rng = np.random.default_rng(seed)
    pairs = [(u, i) for u in range(n_users) for i in range(n_items) if rng.random() < 0.4]
    pairs += [(u, u % n_items) for u in range(n_users)] + [(i % n_users, i) for i in range(n_items)]  # none unrated
    pairs = sorted(set(pairs))
    u, i = (torch.tensor(c) for c in zip(*pairs))
    return u, i, torch.as_tensor(rng.integers(1, 6, len(pairs)), dtype=torch.float32)


@pytest.mark.parametrize("positive_above,l2_exponent,popularity_exponent,confidence",
                         [(None, 0.0, 0.0, 0.0), (3.0, 0.0, 0.0, 0.0), (3.0, 1.0, 0.0, 0.0), (3.0, 0.0, 0.5, 0.0),
                          (None, 1.0, 0.0, 0.5)])
def test_a_full_batch_has_the_gradient_of_the_objective_over_every_pair(positive_above, l2_exponent,
                                                                         popularity_exponent, confidence):
    torch.manual_seed(0)
    u, i, r = ratings()
    model = registry.build(spec(7, 9))
    a0, l2 = 0.3, 0.7
    owned = (torch.arange(7), torch.arange(9))
    objective = ranking.Objective(model, (u, i, r), OneRank(), unobserved=a0, l2=l2, l2_exponent=l2_exponent,
                                  popularity_exponent=popularity_exponent, confidence=confidence, top_rating=5.0,
                                  positive_above=positive_above,
                                  batch=len(u), owned=owned)
    assert objective.refresh_every == 1
    objective.loss(u, i, r, step=0).backward()
    got = model.ranking_user.weight.grad.clone(), model.ranking_item.weight.grad.clone()

    x, y = (t.weight.detach().clone().requires_grad_() for t in (model.ranking_user, model.ranking_item))
    s = x @ y.T
    positive = torch.zeros_like(s, dtype=torch.bool)
    positive[u, i] = True if positive_above is None else r > positive_above
    pick_weight = torch.ones_like(s)
    pick_weight[u, i] = 1 + confidence * r / 5
    n_u, n_i = torch.bincount(u, minlength=7).float(), torch.bincount(i, minlength=9).float()
    row_l2 = [l2 * n_u ** l2_exponent, l2 * n_i ** l2_exponent]
    popularity = n_i ** popularity_exponent
    c = a0 * popularity * 9 / popularity.sum()  # a0 on average over the items
    whole = (pick_weight * (s - 1) ** 2 * positive).sum() + (c * s ** 2 * ~positive).sum() + \
        (row_l2[0] * x.pow(2).sum(1)).sum() + (row_l2[1] * y.pow(2).sum(1)).sum()
    (whole / len(u)).backward()
    torch.testing.assert_close(got[0], x.grad)
    torch.testing.assert_close(got[1], y.grad)


def test_the_grams_are_refreshed_only_as_often_as_the_catalog_needs():
    u, i, r = ratings()
    model = registry.build(spec(7, 9))
    objective = ranking.Objective(model, (u, i, r), OneRank(), unobserved=0.1, l2=1.0, positive_above=None,
                                  batch=2, owned=(torch.arange(7), torch.arange(9)))
    assert objective.refresh_every == 8  # (7 + 9) rows over 2 a batch
    objective.loss(u[:2], i[:2], r[:2], step=0)
    before = objective.item_gram.clone()
    with torch.no_grad():
        model.ranking_item.weight.mul_(2)
    objective.loss(u[:2], i[:2], r[:2], step=1)
    assert torch.equal(objective.item_gram, before)
    objective.loss(u[:2], i[:2], r[:2], step=8)
    torch.testing.assert_close(objective.item_gram, 4 * before)


def test_every_row_is_owned_by_exactly_one_rank():
    local = [np.zeros(10, dtype=bool) for _ in range(3)]
    local[1][[2, 5]] = True
    local[2][[7]] = True
    everyones = torch.tensor([2, 5, 7])
    owned = [ranking.owned_rows(10, rank, 3, local[rank], everyones) for rank in range(3)]
    assert sorted(torch.cat(owned).tolist()) == list(range(10))
    assert {2, 5} <= set(owned[1].tolist()) and 7 in owned[2].tolist()
    assert sorted(torch.cat([ranking.owned_rows(10, rank, 3, None, None) for rank in range(3)]).tolist()) == \
        list(range(10))


def test_a_model_without_a_ranking_dim_has_no_ranking_score_and_the_same_rating_tables():
    torch.manual_seed(1)
    plain = registry.build(spec(7, 9, dim=0))
    torch.manual_seed(1)
    ranked = registry.build(spec(7, 9))
    assert plain.ranking_factors() is None and plain.ranking_user is None
    torch.testing.assert_close(plain.user_embedding.weight, ranked.user_embedding.weight)
    users, items = ranked.ranking_factors()
    assert users.shape == (7, 4) and items.shape == (4, 9)


def batch_with_repeats(seed=3, n_users=7, n_items=9, size=40):
    """A batch of pairs in which users and items come several times, as in a real batch, sorted by user."""
    g = torch.Generator().manual_seed(seed)
    u = torch.sort(torch.randint(0, n_users, (size,), generator=g)).values
    return u, torch.randint(0, n_items, (size,), generator=g), torch.randint(1, 6, (size,), generator=g).float()


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("positive_above,l2_exponent,popularity_exponent,confidence",
                         [(None, 0.0, 0.0, 0.0), (3.0, 1.0, 0.5, 0.5), (None, 1.0, -0.5, 2.0)])
def test_the_compiled_rows_give_the_loss_and_gradients_of_the_torch_rows(sparse, positive_above, l2_exponent,
                                                                          popularity_exponent, confidence):
    """CompiledAllPairs (the CPU's path: per distinct row, by numba kernels) against AllPairsRows (per pair, torch)."""
    u, i, r = ratings()
    results = []
    for compiled in (True, False):
        torch.manual_seed(0)
        model = registry.build(spec(7, 9, dim=5))
        for table in (model.ranking_user, model.ranking_item):
            table.sparse = sparse
        objective = ranking.Objective(model, (u, i, r), OneRank(), unobserved=0.3, l2=0.7, l2_exponent=l2_exponent,
                                      popularity_exponent=popularity_exponent, confidence=confidence, top_rating=5.0,
                                      positive_above=positive_above, batch=len(u),
                                      owned=(torch.arange(7), torch.arange(9)))
        objective.compiled = compiled
        arriving = []  # what a gradient hook (sparse.Rows.distinct) sees: before autograd accumulates it
        for table in (model.ranking_user, model.ranking_item):
            table.weight.register_hook(lambda g: arriving.append((g.is_coalesced(), g._indices()[0].tolist()))
                                       if g.is_sparse else None)
        total = 0.0
        for seed in (3, 4):  # two steps: the second starts from the marks the first left
            loss = objective.loss(*batch_with_repeats(seed), step=seed - 3)
            (3 * loss).backward()  # a gradient from above other than 1
            total += loss.item()
        if compiled and sparse:  # each row once, in order, and marked so: the hook and the optimizer take it as it is
            columns = [c for seed in (3, 4) for c in batch_with_repeats(seed)[:2]]
            assert arriving == [(True, sorted(set(c.tolist()))) for c in columns]
        grads = [t.weight.grad for t in (model.ranking_user, model.ranking_item)]
        assert all(g.is_sparse == sparse for g in grads)
        results.append((total, [g.to_dense() if sparse else g for g in grads]))
    (got, got_grads), (want, want_grads) = results
    assert got == pytest.approx(want, rel=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_distinct_rows_are_the_sorted_unique_rows_with_their_counts_and_places():
    from pipeline import kernels

    rows = np.array([5, 2, 5, 9, 2, 5, 0], dtype=np.int64)
    marks = np.zeros(12, dtype=np.int64)
    distinct, multiplicity, places = (np.empty(len(rows), np.int64) for _ in range(3))
    m = kernels.compiled().distinct_rows(rows, marks, distinct, multiplicity, places)
    unique, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
    assert m == len(unique)
    np.testing.assert_array_equal(distinct[:m], unique)
    np.testing.assert_array_equal(multiplicity[:m], counts)
    np.testing.assert_array_equal(places, inverse)
    assert not marks.any()  # left as it was found, for the next batch


def test_gram_rows_charge_each_distinct_row_its_terms_times_its_multiplicity():
    from pipeline import kernels

    g = torch.Generator().manual_seed(5)
    vectors, a = torch.randn(4, 6, generator=g), torch.randn(10, 6, generator=g)
    gram, rows, multiplicity = a.T @ a, np.array([1, 4, 6, 9]), np.array([3, 1, 2, 5])
    share, l2 = torch.rand(12, generator=g), torch.rand(12, generator=g)
    grads, scale = np.empty((4, 6), np.float32), np.float32(0.25)
    total = kernels.compiled().gram_rows(vectors.numpy(), rows, multiplicity, (vectors @ gram).numpy(), share.numpy(),
                                         l2.numpy(), scale, grads)
    x = vectors.clone().requires_grad_()
    k, s, w = torch.from_numpy(multiplicity).float(), share[rows], l2[rows]
    want = (k * (s * ((x @ gram) * x).sum(1) + w * x.pow(2).sum(1))).sum()
    (scale * want).backward()
    assert total == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(torch.from_numpy(grads), x.grad)


@pytest.mark.parametrize("every", [True, False])
def test_pick_rows_add_the_picks_own_terms_to_their_rows(every):
    from pipeline import kernels

    g = torch.Generator().manual_seed(6)
    users, items = torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g)
    user_places, item_places = np.array([0, 0, 1, 2, 2, 2]), np.array([3, 1, 1, 0, 3, 2])
    item_ids = np.array([7, 2, 2, 0, 7, 5])
    ratings = torch.tensor([1.0, 5, 3, 4, 2, 5])
    weight, above, confidence, scale = torch.rand(8, generator=g), np.float32(2.5), np.float32(0.3), np.float32(0.5)
    start = [torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g)]  # what gram_rows set
    grads = [t.numpy().copy() for t in start]
    total = kernels.compiled().pick_rows(item_ids, users.numpy(), items.numpy(), user_places, item_places,
                                         ratings.numpy(), every, above, confidence, weight.numpy(), scale, *grads)
    x, y = users.clone().requires_grad_(), items.clone().requires_grad_()
    s = (x[user_places] * y[item_places]).sum(1)
    pick = torch.ones(6) if every else (ratings > above).float()
    want = (pick * ((1 + confidence * ratings) * (s - 1) ** 2 - weight[item_ids] * s ** 2)).sum()
    (scale * want).backward()
    assert total == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(torch.from_numpy(grads[0]), start[0] + x.grad)
    torch.testing.assert_close(torch.from_numpy(grads[1]), start[1] + y.grad)


@pytest.mark.parametrize("kind", ["mf", "two_tower", "dmf", "neumf"])
def test_the_ranking_score_adds_the_weighted_rating_head(kind):
    """x_u . y_i + w (unclipped predicted rating - global mean) / (top - bottom): in the factors for the models
    whose rating is a dot product, through ranking_rating_term for the others; w = 0 leaves the plain score."""
    torch.manual_seed(3)
    s = dataclasses.replace(spec(7, 9), model=kind, hidden=[5], rating_levels=[x / 2 for x in range(1, 11)])
    plain, weighted = (registry.build(dataclasses.replace(s, ranking_rating_weight=w)).eval() for w in (0.0, 0.9))
    weighted.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for table in (plain.user_bias, plain.item_bias, weighted.user_bias, weighted.item_bias):
            if table is not None:  # biases start at zero: give them a say
                table.weight.copy_(torch.linspace(-1, 1, len(table.weight))[:, None])
        users, items = torch.arange(7), torch.arange(9)
        ranking = plain.ranking_user.weight @ plain.ranking_item.weight.T
        rating = weighted.score_all(users, items, clip=False)
    assert plain.ranking_rating_term(users) is None
    torch.testing.assert_close(torch.matmul(*plain.ranking_factors()), ranking)
    term = weighted.ranking_rating_term(users)
    assert (term is None) == (kind in ("mf", "two_tower"))
    got = torch.matmul(*weighted.ranking_factors()) + (0 if term is None else term)
    torch.testing.assert_close(got, ranking + 0.9 / 4.5 * (rating - 3.0), rtol=1e-5, atol=1e-5)


def test_a_negative_ranking_rating_weight_is_refused():
    with pytest.raises(ValueError, match="ranking_rating_weight"):
        ModelSpec.of({**dataclasses.asdict(spec(7, 9)), "ranking_rating_weight": -0.1})
