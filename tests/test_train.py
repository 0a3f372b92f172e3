"""Training with 2 Horovod ranks in Spark local mode, on synthetic data with a planted structure."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import artifacts, config, evaluate, metrics, storage
from pipeline.config import ConfigError
from pipeline.data import prepare, synth
from pipeline.storage import StageError
from pipeline.training import train

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ["synth.users=600", "synth.items=300", "synth.ratings=60000", "synth.rank=4", "synth.noise=0.5",
         "synth.seed=7"]
FAST = ["train.epochs=12", "train.patience=3", "train.batch_size=512", "train.lr=0.005", "train.user_dim=16",
        "train.item_dim=16", "train.l2=0.05"]


def cfg(*overrides):
    return config.load(overrides=[*SYNTH, "prepare.max_ranks=2", *FAST, *overrides])


@pytest.fixture(scope="module")
def synthetic(spark, tmp_path_factory):
    base = tmp_path_factory.mktemp("synthetic")
    c = cfg()
    truth = synth.generate(spark, c.synth, str(base / "raw"))
    prepare.prepare(spark, c, str(base / "raw"), str(base / "prepared"))
    return base / "prepared", truth


def valid_rmse_of(model_dir, data_dir) -> float:
    model, _ = artifacts.load_model(str(model_dir))
    valid = pd.read_parquet(Path(data_dir) / "valid")
    with torch.no_grad():
        pred = model.predict(torch.as_tensor(valid.user_idx.to_numpy(), dtype=torch.long),
                             torch.as_tensor(valid.item_idx.to_numpy(), dtype=torch.long)).numpy()
    return metrics.rating_errors(metrics.error_sums(pred, valid.rating.to_numpy()))["rmse"]


def test_mf_learns_the_planted_structure_and_round_trips(spark, synthetic, tmp_path):
    data, truth = synthetic
    m = train.train(spark, cfg(), str(data), str(tmp_path / "mf"))
    rmse = m["metrics"]["valid_rmse"]
    valid = pd.read_parquet(data / "valid")
    baseline = float(np.sqrt(np.mean((valid.rating - m["spec"]["global_mean"]) ** 2)))
    # Within 5% of the generator's oracle (the truth's own error), and far better than the global mean.
    assert rmse <= 1.05 * truth["oracle_rmse"] and rmse < 0.8 * baseline, (rmse, truth["oracle_rmse"], baseline)
    assert len(m["ranks"]) == 2 and all(r["rows"] > 0 for r in m["ranks"])
    assert m["history"][0]["valid_rmse"] > rmse  # it learned something over the epochs
    # The saved weights are the best epoch's, and predict the same numbers after a reload.
    assert valid_rmse_of(tmp_path / "mf", data) == pytest.approx(rmse, abs=1e-5)
    state = torch.load(tmp_path / "mf" / "model.pt", weights_only=True)
    assert "user_embedding.weight" in state or any("user" in k for k in state)
    assert (tmp_path / "mf" / "learning_curves.png").stat().st_size > 1000


def test_one_and_two_ranks_agree_and_runs_repeat(spark, synthetic, tmp_path):
    data, _ = synthetic
    two = train.train(spark, cfg(), str(data), str(tmp_path / "two"))
    one = train.train(spark, cfg("train.num_proc=1", "train.batch_size=1024", "train.lr=0.01", "train.scale_lr=false"),
                      str(data), str(tmp_path / "one"))
    assert abs(one["metrics"]["valid_rmse"] - two["metrics"]["valid_rmse"]) < 0.01
    assert abs(one["metrics"]["valid_ndcg"] - two["metrics"]["valid_ndcg"]) < 0.02, (one["metrics"], two["metrics"])
    again = train.train(spark, cfg(), str(data), str(tmp_path / "again"))
    assert again["history"] == [{**h, "samples_per_s": a["samples_per_s"], "seconds": a["seconds"]}
                                for h, a in zip(two["history"], again["history"])]


def test_the_ranking_score_recovers_the_planted_choices(spark, synthetic, tmp_path):
    """synth plants which items a user rates (synth.choice): lists by the ranking score must beat most popular by
    a wide margin, and lists by predicted rating, which learnt nothing about choices, must not."""
    data, _ = synthetic
    c = cfg()
    train.train(spark, c, str(data), str(tmp_path / "mf"))
    by_score = evaluate.evaluate(spark, c, str(tmp_path / "mf"), None, str(tmp_path / "report"))
    popular = by_score["peers"]["most_popular"]["ndcg@10"]
    assert by_score["order"] == "ranking"
    assert by_score["ranking"]["ndcg@10"] >= 1.5 * popular, (by_score["ranking"], popular)
    assert by_score["ranking"]["users_given_most_popular"] < 0.05
    c.recommend.order = "rating"
    by_rating = evaluate.evaluate(spark, c, str(tmp_path / "mf"), None, str(tmp_path / "rated"))
    assert by_rating["order"] == "rating" and by_rating["ranking"]["ndcg@10"] < popular, by_rating["ranking"]
    assert by_rating["rating"]["rmse"] == by_score["rating"]["rmse"]


def test_sparse_and_fp16_gradient_exchange_train_like_the_dense_allreduce(spark, synthetic, tmp_path):
    data, _ = synthetic
    short = ["train.optimizer=adagrad", "train.lr=0.05", "train.epochs=4", "train.patience=4"]
    dense = train.train(spark, cfg(*short), str(data), str(tmp_path / "dense"))
    sparse = train.train(spark, cfg(*short, "train.sparse_gradients=true"), str(data), str(tmp_path / "sparse"))
    fp16 = train.train(spark, cfg(*short, "train.fp16_allreduce=true"), str(data), str(tmp_path / "fp16"))
    curve = [h["valid_rmse"] for h in dense["history"]]
    # Adagrad leaves untouched rows alone either way, so allgathered sparse rows give the same updates;
    # fp16 rounds the gradients in transit and ends close.
    np.testing.assert_allclose([h["valid_rmse"] for h in sparse["history"]], curve, atol=1e-4)
    # prepare splits the shards by user: each rank keeps its users' rows out of the exchange, and the saved model
    # still holds every rank's updates to them
    local_users = [r["local_rows"]["user_embedding"] for r in sparse["ranks"]]
    assert sum(local_users) == sparse["spec"]["n_users"] and min(local_users) > 0
    dense_model, sparse_model = (artifacts.load_model(str(tmp_path / d))[0] for d in ("dense", "sparse"))
    for name, weight in dense_model.state_dict().items():
        torch.testing.assert_close(sparse_model.state_dict()[name], weight, atol=1e-4, rtol=0, msg=name)
    np.testing.assert_allclose([h["valid_rmse"] for h in fp16["history"]], curve, atol=1e-2)
    assert curve[-1] < curve[0]
    with pytest.raises(ConfigError, match="sparse_gradients needs"):
        cfg("train.sparse_gradients=true")


@pytest.mark.parametrize("model,extra,bound", [
    ("dmf", ["train.hidden=[32,16]", "train.user_dim=24", "train.item_dim=12"], 1.4),
    ("dmf", ["train.head=softmax", "train.genres=true", "train.batch_norm=true", "train.dropout=0.1"], 1.5),
    ("neumf", ["train.hidden=[32,16]"], 1.4),
    ("two_tower", ["train.hidden=[32,16]", "train.genres=true"], 1.4),
    # every rank gathers every item's ratings; the saved model carries them (checked by the reload below)
    ("mf", ["train.item_history=true", "train.history_l2=0.01"], 1.1),
])
def test_other_models_learn(spark, synthetic, tmp_path, model, extra, bound):
    data, truth = synthetic
    m = train.train(spark, cfg(f"train.model={model}", *extra), str(data), str(tmp_path / model))
    # Well below predicting the global mean, and within a stated factor of the oracle.
    assert m["metrics"]["valid_rmse"] <= bound * truth["oracle_rmse"], (m["metrics"], truth["oracle_rmse"])
    # float32 sums over other batch groupings than the ranks' shards: equal to 1e-4, not bit for bit
    assert valid_rmse_of(tmp_path / model, data) == pytest.approx(m["metrics"]["valid_rmse"], abs=1e-4)


def test_dmf_starts_from_a_trained_mf(spark, synthetic, tmp_path):
    data, truth = synthetic
    train.train(spark, cfg(), str(data), str(tmp_path / "mf"))
    dmf = ["train.model=dmf", "train.hidden=[32]", "train.epochs=2", f"train.init_from={tmp_path / 'mf'}"]
    m = train.train(spark, cfg(*dmf), str(data), str(tmp_path / "dmf"))
    assert m["train"]["init_from"] == str(tmp_path / "mf")
    # Two epochs move the copied rows a little; fresh tables would be unrelated to mf's.
    mf_state = torch.load(tmp_path / "mf" / "model.pt", weights_only=True)
    dmf_state = torch.load(tmp_path / "dmf" / "model.pt", weights_only=True)
    for name in ("user_embedding.weight", "item_embedding.weight", "user_bias.weight", "item_bias.weight"):
        assert np.corrcoef(mf_state[name].flatten(), dmf_state[name].flatten())[0, 1] > 0.9, name
    # Started from mf, two epochs reach the bound that a fresh dmf needs twelve for (test_other_models_learn).
    assert m["metrics"]["valid_rmse"] <= 1.4 * truth["oracle_rmse"], (m["metrics"], truth["oracle_rmse"])
    with pytest.raises(ConfigError, match=r"user_embedding.weight is \(600, 16\) there and \(600, 8\) here"):
        train.train(spark, cfg(*dmf, "train.user_dim=8"), str(data), str(tmp_path / "small"))
    with pytest.raises(ConfigError, match="output directory"):
        train.train(spark, cfg(*dmf), str(data), str(tmp_path / "mf"))
    assert not (tmp_path / "small").exists()


def test_bad_configuration_fails_before_any_rank_starts(spark, synthetic, tmp_path):
    data, _ = synthetic
    with pytest.raises(ConfigError, match="train.model must be 'mf', 'dmf', 'neumf' or 'two_tower', got 'svd'"):
        cfg("train.model=svd")
    with pytest.raises(ConfigError, match="user_dim"):
        cfg("train.user_dim=-3")
    with pytest.raises(ConfigError, match="softmax"):
        train.check(spark, cfg("train.head=softmax"), str(data))
    with pytest.raises(StageError, match="no manifest.json"):
        train.train(spark, cfg(), str(tmp_path / "nothing"), str(tmp_path / "m"))
    with pytest.raises(StageError, match="task slots"):
        train.check(spark, cfg("train.num_proc=3", "prepare.max_ranks=4"), str(data))
    old = tmp_path / "old"
    import shutil

    shutil.copytree(data, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 0}))
    with pytest.raises(StageError, match="schema version 0"):
        train.train(spark, cfg(), str(old), str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_resume_after_a_kill_reaches_the_uninterrupted_result(synthetic, tmp_path):
    data, _ = synthetic
    args = [sys.executable, "-m", "pipeline.cli", "train", "--data", str(data), "--set", "prepare.max_ranks=2",
            *[a for o in FAST for a in ("--set", o)], "--set", "train.patience=20"]
    full = subprocess.run([*args, "--out", str(tmp_path / "full")], capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    checkpoint = Path(f"{out}.checkpoint") / "checkpoint.pt"
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["state"]["epoch"] >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    resumed = subprocess.run([*args, "--out", str(out), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = storage.read_manifest(str(tmp_path / "full"), "train")
    b = storage.read_manifest(str(out), "train")
    assert [h["valid_rmse"] for h in b["history"]] == [h["valid_rmse"] for h in a["history"]]
    np.testing.assert_allclose(valid_rmse_of(out, data), valid_rmse_of(tmp_path / "full", data), atol=1e-6)
