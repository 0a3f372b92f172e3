"""One typed config for every stage: YAML file, then `--set key=value` overrides, then explicit flags.

Unknown keys and values of the wrong type fail here, before any Spark job or rank starts.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class SparkConfig:
    master: str | None = "local[2]"  # None: leave it to spark-submit
    app_name: str = "dmf"
    # Spark's default of 200 shuffle partitions costs more than it brings on a laptop; clusters raise it.
    conf: dict = field(default_factory=lambda: {"spark.sql.shuffle.partitions": 8})


@dataclass
class SynthConfig:
    users: int = 2000
    items: int = 800
    ratings: int = 100_000
    rank: int = 8
    noise: float = 0.5
    half_stars: bool = False
    seed: int = 42
    partitions: int = 0  # 0: one per million ratings, at least Spark's default parallelism


@dataclass
class SplitConfig:
    method: str = "random"  # random | user_fraction | user_temporal | global_time
    fraction: float = 0.1  # share of ratings (or of each user's ratings) that go to validation
    last_k: int = 0  # user_temporal: each user's last k ratings instead of a fraction
    cutoff: int | None = None  # global_time: ratings at or after this Unix time go to validation
    seed: int = 42

    METHODS = ("random", "user_fraction", "user_temporal", "global_time")


@dataclass
class PrepareConfig:
    input: str | None = None
    format: str = "auto"  # auto | ml-100k | ml-1m | ml-10m | csv | parquet
    min_user_ratings: int = 0
    min_item_ratings: int = 0
    max_reject_fraction: float = 0.01
    max_ranks: int = 8  # Parquet is written with enough row groups to shard across this many ranks
    row_groups_per_rank: int = 4
    split: SplitConfig = field(default_factory=SplitConfig)

    FORMATS = ("auto", "ml-100k", "ml-1m", "ml-10m", "csv", "parquet")


@dataclass
class TrainConfig:
    model: str = "mf"  # mf | dmf | neumf | two_tower
    user_dim: int = 32
    item_dim: int = 32
    hidden: list = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    batch_norm: bool = False
    head: str = "regression"  # regression | softmax
    genres: bool = False  # item genres as side features
    item_history: bool = False  # each item's training ratings as a side feature (see pipeline.models)
    history_l2: float = 0.05  # L2 on the rater vectors of the item history, per epoch
    history_size: int = 256  # raters an item's history keeps at most (a seeded sample); 0: all of them
    l2: float = 0.05  # on the embedding rows that appear in a batch
    bias_l2: float | None = None  # on the user and item biases in a batch; None: the same as l2
    weight_decay: float = 0.0  # on the dense (MLP) weights
    lr: float = 0.003  # for one rank; multiplied by the number of ranks when scale_lr is true
    scale_lr: bool = True
    lr_decay: float = 1.0  # the learning rate is multiplied by this after every epoch
    optimizer: str = "adam"  # adam | sgd | adagrad
    batch_size: int = 1024  # per rank
    epochs: int = 20
    patience: int = 3
    num_proc: int = 2
    seed: int = 42
    sparse_gradients: bool = False  # allgather sparse embedding gradients instead of a dense allreduce
    fp16_allreduce: bool = False
    threads_per_rank: int = 0  # 0: the machine's cores divided by the ranks on it
    init_from: str | None = None  # a model trained on the same prepared data: parameters of the same name start from it

    MODELS = ("mf", "dmf", "neumf", "two_tower")
    HEADS = ("regression", "softmax")
    OPTIMIZERS = ("adam", "sgd", "adagrad")


@dataclass
class RecommendConfig:
    top_n: int = 10
    users_per_block: int = 512  # dmf/neumf grids are block x 2048 items x first hidden width floats
    format: str = "parquet"  # parquet | csv
    candidates: int = 0  # two-stage mode: retrieve this many by dot product, re-rank with the model


@dataclass
class EvaluateConfig:
    k: int = 10
    relevant_rating: float = 4.0


@dataclass
class Config:
    work_dir: str = "./work"
    dataset: str = "synthetic"
    run: str = "default"
    spark: SparkConfig = field(default_factory=SparkConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def path(self, *parts: str) -> str:
        """A path under the work directory, e.g. cfg.path("prepared", cfg.dataset)."""
        return "/".join([self.work_dir.rstrip("/"), *parts])

    def validate(self) -> "Config":
        checks = [
            (self.prepare.format in PrepareConfig.FORMATS, f"prepare.format must be one of {PrepareConfig.FORMATS}"),
            (self.prepare.split.method in SplitConfig.METHODS, f"prepare.split.method must be one of {SplitConfig.METHODS}"),
            (0 < self.prepare.split.fraction < 1, "prepare.split.fraction must lie between 0 and 1"),
            (self.prepare.split.method != "global_time" or self.prepare.split.cutoff is not None,
             "prepare.split.cutoff (Unix seconds) is required by the global_time split"),
            (0 <= self.prepare.max_reject_fraction <= 1, "prepare.max_reject_fraction must lie between 0 and 1"),
            (self.prepare.max_ranks >= 1 and self.prepare.row_groups_per_rank >= 1,
             "prepare.max_ranks and prepare.row_groups_per_rank must be at least 1"),
            (self.train.model in TrainConfig.MODELS, f"train.model must be one of {TrainConfig.MODELS}, not {self.train.model!r}"),
            (self.train.head in TrainConfig.HEADS, f"train.head must be one of {TrainConfig.HEADS}"),
            (self.train.optimizer in TrainConfig.OPTIMIZERS, f"train.optimizer must be one of {TrainConfig.OPTIMIZERS}"),
            (not self.train.sparse_gradients or self.train.optimizer == "adagrad",
             "train.sparse_gradients needs train.optimizer adagrad (torch's Adam takes dense gradients only, and "
             "SGD's momentum would grow a sparse buffer every step)"),
            (not (self.train.sparse_gradients and self.train.fp16_allreduce),
             "train.fp16_allreduce compresses the dense allreduce; Horovod's sparse allgather cannot take it, so "
             "choose one of train.sparse_gradients and train.fp16_allreduce"),
            (not (self.train.sparse_gradients and self.train.item_history),
             "train.item_history touches the rater vector of nearly every user at every step: it needs the dense "
             "allreduce, not train.sparse_gradients"),
            (self.train.history_l2 >= 0 and self.train.history_size >= 0,
             "train.history_l2 and train.history_size must not be negative"),
            (self.train.user_dim > 0 and self.train.item_dim > 0, "train.user_dim and train.item_dim must be positive"),
            (all(isinstance(h, int) and h > 0 for h in self.train.hidden), "train.hidden must be a list of positive sizes"),
            (self.train.model != "mf" or self.train.user_dim == self.train.item_dim,
             "train.model mf takes a dot product, so train.user_dim must equal train.item_dim"),
            (self.train.model != "two_tower" or self.train.hidden, "two_tower needs train.hidden"),
            (0 <= self.train.dropout < 1, "train.dropout must lie in [0, 1)"),
            (self.train.lr > 0 and self.train.batch_size > 0, "train.lr and train.batch_size must be positive"),
            (0 < self.train.lr_decay <= 1, "train.lr_decay must lie in (0, 1]"),
            (self.train.epochs > 0 and self.train.patience > 0, "train.epochs and train.patience must be positive"),
            (self.train.num_proc >= 1, "train.num_proc must be at least 1"),
            (self.train.l2 >= 0 and self.train.weight_decay >= 0 and (self.train.bias_l2 or 0) >= 0,
             "train.l2, train.bias_l2 and train.weight_decay must not be negative"),
            (1 <= self.recommend.top_n <= 1000, "recommend.top_n must lie between 1 and 1000"),
            (self.recommend.candidates == 0 or self.recommend.candidates >= self.recommend.top_n,
             "recommend.candidates must be 0 (score every item) or at least recommend.top_n"),
            (self.recommend.format in ("parquet", "csv"), "recommend.format must be parquet or csv"),
            (self.evaluate.k >= 1, "evaluate.k must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key {where + '.' if where else ''}{unknown[0]}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(hint, value, key)
    return cls(**kwargs)


def _coerce(hint, value, key):
    allowed = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} must not be empty")
    for t in allowed:
        t = typing.get_origin(t) or t
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t in (int, str, bool, list, dict) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    raise ConfigError(f"{key} must be {hint}, got {value!r}")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """`train.lr=0.01` -> {"train": {"lr": 0.01}}; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set takes key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return _nest(key.strip(), yaml.safe_load(raw) if raw else "")


def load(path: str | None = None, overrides: list[str] = (), flags: dict | None = None) -> Config:
    """The config from a YAML file (or the defaults), `--set` overrides, then explicit flags (dotted keys).

    A file may hold a `models:` section of tuned train settings per model name; those of the chosen
    train.model apply over the file's `train:` section and under `--set` and flags."""
    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        values = yaml.safe_load(p.read_text()) or {}
    per_model = values.pop("models", None) or {}
    unknown = sorted(set(per_model) - set(TrainConfig.MODELS))
    if unknown:
        raise ConfigError(f"{path}: models.{unknown[0]} is not a model; known: {', '.join(TrainConfig.MODELS)}")
    later: dict = {}
    for text in overrides:
        later = _merge(later, parse_override(text))
    for key, value in (flags or {}).items():
        if value is not None:
            later = _merge(later, _nest(key, value))
    model = later.get("train", {}).get("model") or values.get("train", {}).get("model") or TrainConfig.model
    values = _merge(_merge(values, {"train": per_model.get(model) or {}}), later)
    return _build(Config, values, "").validate()


def _nest(key: str, value) -> dict:
    # Spark's own keys are dotted: spark.conf.spark.sql.shuffle.partitions is one entry of spark.conf.
    parts = key.split(".", 2) if key.startswith("spark.conf.") else key.split(".")
    for part in reversed(parts):
        value = {part: value}
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
