"""pipeline.training.sparse.Adagrad against torch's Adagrad: the same steps from the same gradients."""
import copy

import numpy as np
import pytest
import torch

from pipeline.training import sparse


def sparse_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"table": torch.nn.Embedding(50, 8, sparse=True), "dense": torch.nn.Linear(8, 1)})


def train(model, optimizer, steps=5):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        rows = torch.randint(0, 12, (40,), generator=g)  # few rows, so most of them come more than once
        model["dense"](model["table"](rows)).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("lr_decay", [0.0, 0.5])
def test_sparse_rows_step_like_torch_adagrad(lr_decay):
    ours, theirs = sparse_model(), sparse_model()
    mine = sparse.Adagrad(ours.parameters(), lr=0.1, lr_decay=lr_decay)
    train(ours, mine)
    train(theirs, torch.optim.Adagrad(theirs.parameters(), lr=0.1, lr_decay=lr_decay))
    for name, p in ours.named_parameters():
        assert torch.allclose(p, dict(theirs.named_parameters())[name], atol=1e-6), name
    assert not torch.equal(ours["table"].weight, sparse_model()["table"].weight)  # it did move
    # rows no batch touched keep their values and their zero sums
    assert torch.equal(ours["table"].weight[12:], sparse_model()["table"].weight[12:])
    assert torch.count_nonzero(mine.state[ours["table"].weight]["sum"][12:]) == 0
    assert ours["table"].weight.grad is not None and ours["table"].weight.grad.is_sparse  # step leaves the gradient


def test_the_gradient_hook_sums_duplicate_rows_and_changes_no_step():
    hooked, plain = sparse_model(), sparse_model()
    hooked["table"].weight.register_hook(sparse.Rows(hooked["table"].weight).distinct)
    rows = torch.tensor([3, 7, 3, 3, 0])
    hooked["table"](rows).sum().backward()
    grad = hooked["table"].weight.grad
    assert sorted(grad._indices()[0].tolist()) == [0, 3, 7]
    assert torch.equal(grad.to_dense()[3], torch.full((8,), 3.0))
    train(hooked, sparse.Adagrad(hooked.parameters(), lr=0.1))
    train(plain, sparse.Adagrad(plain.parameters(), lr=0.1))
    assert torch.allclose(hooked["table"].weight, plain["table"].weight, atol=1e-6)


def test_local_rows_stay_out_of_the_exchange_and_come_back_for_the_step():
    model = sparse_model()
    local = np.zeros(50, dtype=bool)
    local[[3, 9]] = True  # rows that only this rank reads
    rows = sparse.Rows(model["table"].weight, local, ranks=2)
    model["table"].weight.register_hook(rows.distinct)
    model["table"](torch.tensor([3, 7, 3, 9, 0, 7, 7])).sum().backward()
    exchanged = model["table"].weight.grad
    assert sorted(exchanged._indices()[0].tolist()) == [0, 7]
    assert torch.equal(exchanged.to_dense()[7], torch.full((8,), 3.0))  # the exchange divides these by the ranks
    full = rows.with_local(exchanged).to_dense()
    assert torch.equal(full[3], torch.full((8,), 1.0)) and torch.equal(full[9], torch.full((8,), 0.5))
    assert torch.equal(full[[0, 7]], exchanged.to_dense()[[0, 7]])
    assert rows.with_local(exchanged) is exchanged  # added once only


def test_a_single_rank_with_every_row_local_steps_like_no_local_rows():
    local, plain = sparse_model(), sparse_model()
    rows = sparse.Rows(local["table"].weight, np.ones(50, dtype=bool))
    local["table"].weight.register_hook(rows.distinct)
    optimizer = sparse.Adagrad(local.parameters(), lr=0.1)
    original_step = optimizer.step

    def step():  # as the training loop does between the exchange and the step
        local["table"].weight.grad = rows.with_local(local["table"].weight.grad)
        original_step()

    optimizer.step = step
    train(local, optimizer)
    train(plain, sparse.Adagrad(plain.parameters(), lr=0.1))
    assert torch.equal(local["table"].weight, plain["table"].weight)


def test_state_round_trips_for_a_resumed_run():
    model = sparse_model()
    first = sparse.Adagrad(model.parameters(), lr=0.1)
    train(model, first, steps=3)
    resumed = copy.deepcopy(model)
    again = sparse.Adagrad(resumed.parameters(), lr=0.1)
    again.load_state_dict(copy.deepcopy(first.state_dict()))  # as read back from a checkpoint file
    train(model, first, steps=2)
    train(resumed, again, steps=2)
    assert torch.equal(model["table"].weight, resumed["table"].weight)


@pytest.mark.parametrize("option", [{"weight_decay": 0.1}, {"maximize": True}])
def test_sparse_gradients_refuse_what_the_kernel_does_not_do(option):
    model = sparse_model()
    before = copy.deepcopy(model)
    optimizer = sparse.Adagrad(model.parameters(), lr=0.1, **option)
    with pytest.raises(ValueError, match=next(iter(option))):
        train(model, optimizer, steps=1)
    for name, p in model.named_parameters():  # refused before anything moved
        assert torch.equal(p, dict(before.named_parameters())[name]), name


def test_a_copied_optimizer_steps_like_the_original():
    model = sparse_model()
    optimizer = sparse.Adagrad(model.parameters(), lr=0.1)
    train(model, optimizer, steps=1)
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))  # one copy: the optimizer holds the copy's tables
    train(model, optimizer, steps=2)
    train(model_copy, optimizer_copy, steps=2)
    assert torch.equal(model["table"].weight, model_copy["table"].weight)


def coalesced(rows, values, n=50):
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, (n, values.shape[1]), is_coalesced=True)


def test_a_gradient_with_each_row_once_steps_like_torch_adagrad_without_a_sum():
    ours, theirs = sparse_model(), sparse_model()
    mine = sparse.Adagrad([ours["table"].weight], lr=0.1)
    torch_adagrad = torch.optim.Adagrad([theirs["table"].weight], lr=0.1)
    g = torch.Generator().manual_seed(2)
    for step in range(4):
        rows = sorted(torch.randperm(50, generator=g)[:7].tolist())
        values = torch.randn(7, 8, generator=g)
        ours["table"].weight.grad = coalesced(rows, values)
        theirs["table"].weight.grad = coalesced(rows, values.clone()).coalesce()
        mine.step()
        torch_adagrad.step()
        assert torch.allclose(ours["table"].weight, theirs["table"].weight, atol=1e-6), step
    rows = mine._rows[ours["table"].weight]
    assert len(rows.sums) == 0 and (rows.slot == -1).all()  # nothing summed into scratch; every place given back


@pytest.mark.parametrize("local_rows", [[3, 9, 20], [3, 9]])
def test_a_gradient_with_each_row_once_keeps_its_local_rows_back_without_a_sum(local_rows):
    table = sparse_model()["table"].weight
    local = np.zeros(50, dtype=bool)
    local[local_rows] = True
    rows = sparse.Rows(table, local, ranks=2)
    grad = coalesced([3, 9, 20], torch.arange(24, dtype=torch.float32).view(3, 8))
    exchanged = rows.distinct(grad)
    assert exchanged._indices()[0].tolist() == [r for r in (3, 9, 20) if r not in local_rows]
    full = rows.with_local(exchanged)
    torch.testing.assert_close(full.to_dense()[local_rows], grad.to_dense()[local_rows] / 2)
    # every row local (a user table): what comes back is still each row once, in order, for the optimizer's fast path
    assert full.is_coalesced() == (len(local_rows) == 3)
