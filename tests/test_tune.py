"""dmf tune: a 3-trial seeded search on the small synthetic set, through the CLI as a user runs it."""
import pytest
import yaml

from pipeline import cli, config


@pytest.mark.slow
def test_a_three_trial_search_writes_the_best_setting_as_a_config(spark, small_mf, tmp_path, capsys):
    cfg, base = small_mf
    out = tmp_path / "tuned.yaml"
    args = ["tune", "--data", str(base / "data"), "--work-dir", str(tmp_path / "work"), "--target", "ndcg",
            "--trials", "3", "--out", str(out), "--set", "prepare.max_ranks=2", "--set", "train.epochs=3",
            "--set", "train.user_dim=8", "--set", "train.item_dim=8"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("trial ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"] and all("NDCG@10" in line for line in lines)
    text = out.read_text()
    assert text.startswith("# dmf tune --target ndcg --trials 3")
    tuned = config.load(str(out))  # what dmf train --config takes
    assert tuned.train.user_dim == 8 and tuned.train.epochs == 3
    best = [line for line in lines if f"ranking_l2={tuned.train.ranking_l2:.4g} " in line]
    assert len(best) == 1 and f"ranking_dim={tuned.train.ranking_dim} " in best[0]
    assert not any((tmp_path / "work" / "tune").iterdir())  # the trials' models are removed
    assert yaml.safe_load(text)["train"]["ranking_positives"] in ("above_mean", "all")

    foreign = tmp_path / "mine.yaml"
    foreign.write_text("train: {lr: 0.1}\n")
    assert cli.main([*args[:-8], "--out", str(foreign), "--trials", "1"]) == 1
    assert "is not a file dmf tune wrote" in capsys.readouterr().err and foreign.read_text() == "train: {lr: 0.1}\n"
