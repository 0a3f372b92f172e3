"""Config precedence: file, then the file's per-model settings, then --set, then flags."""
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_per_model_settings_apply_to_the_chosen_model_only(tmp_path):
    path = write(tmp_path, "train: {model: mf, l2: 0.3, lr: 0.01}\n"
                           "models: {mf: {l2: 0.1}, dmf: {l2: 0.02, dropout: 0.5}}\n")
    mf = config.load(path).train
    assert (mf.model, mf.l2, mf.lr, mf.dropout) == ("mf", 0.1, 0.01, 0.0)
    dmf = config.load(path, ["train.model=dmf"]).train
    assert (dmf.l2, dmf.dropout, dmf.lr) == (0.02, 0.5, 0.01)
    assert config.load(path, ["train.model=dmf", "train.l2=0.2"]).train.l2 == 0.2
    assert config.load(path, flags={"train.model": "neumf"}).train.l2 == 0.3
    assert config.load(path, ["train.l2=0.7"], flags={"train.l2": 0.9}).train.l2 == 0.9


def test_bad_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="models.svd is not a model"):
        config.load(write(tmp_path, "models: {svd: {l2: 0.1}}\n"))
    with pytest.raises(ConfigError, match="unknown config key train.l3"):
        config.load(write(tmp_path, "models: {mf: {l3: 0.1}}\n"))
    for optimizer in ("adam", "sgd"):
        with pytest.raises(ConfigError, match="sparse_gradients needs train.optimizer adagrad"):
            config.load(overrides=["train.sparse_gradients=true", f"train.optimizer={optimizer}"])
    with pytest.raises(ConfigError, match="choose one of train.sparse_gradients and train.fp16_allreduce"):
        config.load(overrides=["train.sparse_gradients=true", "train.optimizer=adagrad", "train.fp16_allreduce=true"])
    with pytest.raises(ConfigError, match="lr_decay"):
        config.load(overrides=["train.lr_decay=0"])
    with pytest.raises(ConfigError, match="item_history .* needs the dense allreduce"):
        config.load(overrides=["train.item_history=true", "train.sparse_gradients=true", "train.optimizer=adagrad"])
    with pytest.raises(ConfigError, match=r"train.history_size must be greater than or equal to 0, got -1"):
        config.load(overrides=["train.history_size=-1"])


def test_shipped_configs_load_for_every_model():
    for name in ("ml-100k", "ml-1m", "ml-20m", "cluster.example"):
        for model in config.choices(config.TrainConfig, "model"):
            config.load(str(Path(__file__).resolve().parents[1] / "conf" / f"{name}.yaml"), [f"train.model={model}"])


@pytest.mark.parametrize("override,message", [
    ("recommend.users_per_block=-1", "recommend.users_per_block must be greater than or equal to 1, got -1"),
    ("recommend.users_per_block=0", "recommend.users_per_block must be greater than or equal to 1, got 0"),
    ("train.threads_per_rank=-1", "train.threads_per_rank must be greater than or equal to 0, got -1"),
    ("train.hidden=[64, 0]", r"train.hidden\[1\] must be greater than or equal to 1, got 0"),
    ("train.lr=0", "train.lr must be greater than 0, got 0"),
    ("synth.seed=-2", "synth.seed must be greater than or equal to 0, got -2"),
    ("prepare.split.fraction=1.5", "prepare.split.fraction must be less than 1, got 1.5"),
    ("train.epochs=2.5", "train.epochs must be a valid integer"),
    ("recommend.format=json", "recommend.format must be 'parquet' or 'csv', got 'json'"),
])
def test_every_numeric_setting_has_its_range_checked_where_it_is_declared(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=[override])


def test_a_config_built_in_code_is_checked_too():
    with pytest.raises(ValueError, match="users"):
        config.SynthConfig(users=0)


def test_a_flag_means_one_thing_and_old_spellings_still_work_for_a_release():
    from pipeline import cli

    p = cli.parser()
    run = p.parse_args(["run", "--input", "ratings.dat", "--format", "ml-1m", "--output-format", "csv",
                        "--model", "dmf"])
    assert cli.load_config(run).prepare.format == "ml-1m" and cli.load_config(run).recommend.format == "csv"
    assert cli.load_config(run).train.model == "dmf"
    old = p.parse_args(["recommend", "--model", "/models/a", "--format", "csv", "--retrieval-model", "/models/b"])
    messages = cli.renamed_flags(old)
    assert (old.model_dir, old.retrieval_model_dir, cli.load_config(old).recommend.format) == (
        "/models/a", "/models/b", "csv")
    assert messages == [f"dmf recommend: {a} is now {b} (the old spelling goes in the next release)" for a, b in
                        (("--model", "--model-dir"), ("--retrieval-model", "--retrieval-model-dir"),
                         ("--format", "--output-format"))]
    new = p.parse_args(["evaluate", "--model-dir", "/models/a"])
    assert cli.renamed_flags(new) == [] and new.model_dir == "/models/a"


def test_print_config_shows_what_a_command_runs_with_and_reads_back(tmp_path, capsys):
    from pipeline import cli

    root = Path(__file__).resolve().parents[1]
    argv = ["train", "--config", str(root / "conf" / "ml-100k.yaml"), "--model", "dmf", "--set", "train.lr=0.002",
            "--print-config"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    again = config.load(str(tmp_path / "resolved.yaml"))
    assert again == cli.load_config(cli.parser().parse_args(argv))
    assert (again.train.model, again.train.lr, again.train.hidden) == ("dmf", 0.002, [256, 64])  # models.dmf applied
    assert cli.main(["run", "--print-config"]) == 0 and config.load() == config.load(overrides=[])


def test_the_model_rules_are_the_spec_s_and_apply_before_anything_runs():
    with pytest.raises(ConfigError, match="mf takes a dot product, so train.user_dim .32. must equal train.item_dim"):
        config.load(overrides=["train.item_dim=8"])
    with pytest.raises(ConfigError, match="mf cannot use the softmax head"):
        config.load(overrides=["train.head=softmax"])
    with pytest.raises(ConfigError, match="two_tower needs at least one hidden layer size"):
        config.load(overrides=["train.model=two_tower", "train.hidden=[]"])
