"""One typed config for every stage: YAML file, then `--set key=value` overrides, then explicit flags.

Each setting declares its type and range where it is defined (pydantic checks them); rules that tie
settings together live in Config.validate. Unknown keys, values of the wrong type and values out of
range fail here, before any Spark job or rank starts.
"""
import dataclasses
import datetime
import typing
import urllib.parse
from typing import Annotated, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from pipeline.models.spec import ModelName, check_settings
from pipeline.storage import filesystem

# Lax mode: YAML's 1 is a valid float and --set's "8" a valid int; strict mode would refuse nested mappings.
SETTINGS = ConfigDict(extra="forbid")
NonNegative = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
Seed = NonNegative  # numpy's generators take no negative seed


# A run directory's name; YAML (a file or --set) reads an unquoted 2025-06-01 as a date.
RunId = Annotated[str, BeforeValidator(lambda v: v.isoformat() if isinstance(v, datetime.date) else v),
                  Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class ConfigError(ValueError):
    pass


@dataclass(config=SETTINGS)
class SparkConfig:
    master: str | None = "local[2]"  # None: leave it to spark-submit
    app_name: str = "dmf"
    # The interface that Spark's driver, its UI and Horovod's servers bind to; unset: loopback (lo) in local
    # mode, every interface on a cluster (name the one the cluster network uses, e.g. eth0).
    network_interface: str | None = None
    # Spark's default of 200 shuffle partitions costs more than it brings on a laptop; clusters raise it.
    conf: dict = Field(default_factory=lambda: {"spark.sql.shuffle.partitions": 8})


@dataclass(config=SETTINGS)
class SynthConfig:
    users: Positive = 2000
    items: Positive = 800
    ratings: Positive = 100_000
    rank: Positive = 8
    noise: float = Field(0.5, ge=0)
    half_stars: bool = False
    # How strongly the planted factors decide which items a user rates (pipeline.data.synth.pick); 0: popularity
    # alone, so that no ranking model can beat most-popular.
    choice: float = Field(1.5, ge=0)
    seed: Seed = 42
    partitions: NonNegative = 0  # 0: one per million ratings, at least Spark's default parallelism


@dataclass(config=SETTINGS)
class SplitConfig:
    method: Literal["random", "user_fraction", "user_temporal", "global_time"] = "random"
    fraction: float = Field(0.1, gt=0, lt=1)  # share of ratings (or of each user's ratings) that go to validation
    last_k: NonNegative = 0  # user_temporal: each user's last k ratings instead of a fraction
    cutoff: int | None = None  # global_time: ratings at or after this Unix time go to validation
    seed: Seed = 42


@dataclass(config=SETTINGS)
class PrepareConfig:
    input: str | None = None
    format: Literal["auto", "ml-100k", "ml-1m", "ml-10m", "csv", "parquet"] = "auto"
    min_user_ratings: NonNegative = 0
    min_item_ratings: NonNegative = 0
    max_reject_fraction: float = Field(0.01, ge=0, le=1)
    max_ranks: Positive = 8  # Parquet is written with enough row groups to shard across this many ranks
    row_groups_per_rank: Positive = 4
    split: SplitConfig = Field(default_factory=SplitConfig)


@dataclass(config=SETTINGS)
class TrainConfig:
    model: ModelName = "mf"
    user_dim: Positive = 32
    item_dim: Positive = 32
    hidden: list[Positive] = Field(default_factory=lambda: [64, 32])
    dropout: float = Field(0.0, ge=0, lt=1)
    batch_norm: bool = False
    head: Literal["regression", "softmax"] = "regression"
    genres: bool = False  # item genres as side features
    item_history: bool = False  # each item's training ratings as a side feature (see pipeline.models.base)
    history_l2: float = Field(0.05, ge=0)  # L2 on the rater vectors of the item history, per epoch
    history_size: NonNegative = 256  # raters an item's history keeps at most (a seeded sample); 0: all of them
    l2: float = Field(0.05, ge=0)  # on the embedding rows that appear in a batch
    bias_l2: float | None = Field(None, ge=0)  # on the user and item biases in a batch; None: the same as l2
    weight_decay: float = Field(0.0, ge=0)  # on the dense (MLP) weights
    lr: float = Field(0.003, gt=0)  # for one rank; multiplied by the number of ranks when scale_lr is true
    scale_lr: bool = True
    lr_decay: float = Field(1.0, gt=0, le=1)  # the learning rate is multiplied by this after every epoch
    optimizer: Literal["adam", "sgd", "adagrad"] = "adam"
    batch_size: Positive = 1024  # per rank
    epochs: Positive = 20
    patience: Positive = 3
    num_proc: Positive = 2
    seed: Seed = 42
    sparse_gradients: bool = False  # allgather sparse embedding gradients instead of a dense allreduce
    fp16_allreduce: bool = False
    threads_per_rank: NonNegative = 0  # 0: the machine's cores divided by the ranks on it
    init_from: str | None = None  # a model trained on the same prepared data: parameters of the same name start from it
    # The ranking score that orders the top-N (pipeline.training.ranking): its tables' dimension (0: none, and the
    # lists are ordered by predicted rating), the weight of every pair the user did not pick, the L2 on its tables,
    # and which training ratings count as picks (all, or those above the training mean). The defaults are the best of
    # docs/benchmarks/search-ml-100k-ranking.md: Hu et al.'s confidence-weighted picks with Spark ALS's L2.
    ranking_dim: NonNegative = 64
    ranking_loss: Literal["all_pairs", "softmax"] = "all_pairs"  # see pipeline.training.ranking
    ranking_unobserved: float = Field(1.0, gt=0)
    ranking_l2: float = Field(0.1, ge=0)
    ranking_l2_exponent: float = Field(1.0, ge=0, le=1)  # 1: a row's L2 grows with its ratings (see ranking)
    ranking_popularity_exponent: float = Field(0.0, ge=-1, le=1)  # > 0: unpicked popular items weigh more, < 0 less
    ranking_positives: Literal["above_mean", "all"] = "all"
    ranking_confidence: float = Field(0.5, ge=0)  # a pick's weight: 1 + this x rating / top of the scale
    # The lists are ordered by the ranking score + this x (predicted rating - mean) / (top - bottom of the scale):
    # of the items a user would pick, those they would rate higher first (docs/benchmarks/topn.md).
    ranking_rating_weight: float = Field(0.4, ge=0)


@dataclass(config=SETTINGS)
class RecommendConfig:
    top_n: int = Field(10, ge=1, le=1000)
    users_per_block: Positive = 512  # dmf/neumf grids are block x 2048 items x first hidden width floats
    format: Literal["parquet", "csv"] = "parquet"
    candidates: NonNegative = 0  # two-stage mode: retrieve this many by dot product, re-rank with the model
    # What orders the lists: auto is the ranking score when the model has one (train.ranking_dim > 0), else the
    # predicted rating; two-stage mode re-ranks by predicted rating.
    order: Literal["auto", "ranking", "rating"] = "auto"
    # Ordered by the ranking score, a user's query vector x_u leans towards the ranking vectors of the last
    # `recent_items` items they rated: x_u + recent_weight x |x_u| x v / |v|, v the sum of those items' ranking
    # vectors (0 items or weight: off).
    # What a user picks next resembles what they picked last (docs/benchmarks/topn.md measures both splits).
    recent_items: NonNegative = 5
    recent_weight: float = Field(0.2, ge=0)


@dataclass(config=SETTINGS)
class EvaluateConfig:
    k: Positive = 10
    relevant_rating: float = 4.0  # any value: ratings scales differ (0.5-5, 1-10, ...)
    # EASE, a peer in the report, inverts a dense item x item matrix per lambda tried (see pipeline/peers.py).
    ease_max_items: NonNegative = 10_000


@dataclass(config=SETTINGS)
class ScheduleConfig:
    # dmf run writes under work_dir/runs/RUN_ID/ (None: today's UTC date); a stage command only when it is set.
    run_id: RunId | None = None
    # The gate in front of CURRENT: bounds on the evaluate report (None or 0: not checked) and on how much worse
    # than CURRENT's run, as a fraction of its RMSE and of its NDCG@k, a new run may be.
    max_valid_rmse: float | None = Field(None, gt=0)
    min_ndcg: float = Field(0.0, ge=0, le=1)
    max_regression: float = Field(0.05, ge=0)
    keep_runs: Positive = 7  # the newest runs that retention keeps, besides the one CURRENT points at


# A table name as pipeline.publish.table_name takes it: a plain identifier, optionally schema-qualified.
TableName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,50}(\.[A-Za-z_][A-Za-z0-9_]{0,50})?$")]


@dataclass(config=SETTINGS)
class PublishConfig:
    # postgresql://USER@HOST:PORT/DB; None: dmf run publishes nothing. The password comes only from PGPASSWORD
    # or ~/.pgpass (PGPASSFILE): a URL carrying one is refused.
    db_url: str | None = None
    table: TableName = "recommendations"  # what the login path reads; <table>_popular is the fallback beside it
    similar: bool = False  # also each item's similar_k nearest items, from the model the recommendations came from
    similar_table: TableName | None = None  # None: <table>_similar
    similar_k: int = Field(10, ge=1, le=1000)
    writers: Positive = 8  # Spark's concurrent JDBC connections to the database


def choices(cls, name: str) -> tuple:
    """The values a Literal setting takes, e.g. choices(TrainConfig, "model")."""
    return typing.get_args(typing.get_type_hints(cls)[name])


@dataclass(config=SETTINGS)
class Config:
    work_dir: str = "./work"
    dataset: str = "synthetic"
    run: str = "default"
    spark: SparkConfig = Field(default_factory=SparkConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    recommend: RecommendConfig = Field(default_factory=RecommendConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)

    def path(self, *parts: str) -> str:
        """A path under the work directory, e.g. cfg.path("prepared", cfg.dataset)."""
        return "/".join([self.work_dir.rstrip("/"), *parts])

    def validate(self) -> "Config":
        checks = [
            (self.prepare.split.method != "global_time" or self.prepare.split.cutoff is not None,
             "prepare.split.cutoff (Unix seconds) is required by the global_time split"),
            (not self.train.sparse_gradients or self.train.optimizer == "adagrad",
             "train.sparse_gradients needs train.optimizer adagrad (torch's Adam takes dense gradients only, and "
             "SGD's momentum would grow a sparse buffer every step)"),
            (not (self.train.sparse_gradients and self.train.fp16_allreduce),
             "train.fp16_allreduce compresses the dense allreduce; Horovod's sparse allgather cannot take it, so "
             "choose one of train.sparse_gradients and train.fp16_allreduce"),
            (not (self.train.sparse_gradients and self.train.item_history),
             "train.item_history touches the rater vector of nearly every user at every step: it needs the dense "
             "allreduce, not train.sparse_gradients"),
            (not self.publish.db_url or urllib.parse.urlsplit(self.publish.db_url).password is None,
             "publish.db_url carries a password: remove it and set PGPASSWORD or add a ~/.pgpass line instead"),
            (self.recommend.candidates == 0 or self.recommend.order != "ranking",
             "recommend.candidates re-ranks the retrieved items by predicted rating: set recommend.order to rating "
             "or auto, or recommend.candidates to 0 to order every item by the ranking score"),
            (self.recommend.candidates == 0 or self.recommend.candidates >= self.recommend.top_n,
             "recommend.candidates must be 0 (score every item) or at least recommend.top_n"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        t = self.train
        try:
            check_settings(t.model, t.user_dim, t.item_dim, t.hidden, t.head)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self


def dump(cfg: Config) -> str:
    """The whole config as YAML, every key resolved: what `--print-config` prints and what `--config` reads back."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def _build(values: dict) -> Config:
    if not isinstance(values, dict):
        raise ConfigError(f"config must be a mapping, got {values!r}")
    try:
        return Config(**values)
    except ValidationError as e:
        raise ConfigError("; ".join(_problem(error) for error in e.errors())) from None


def _problem(error: dict) -> str:
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        section = _section(error["loc"][:-1])
        return f"unknown config key {key}; known: {sorted(f.name for f in dataclasses.fields(section))}"
    message = error["msg"].replace("Input should be", "must be", 1)
    return f"{key} {message}, got {error['input']!r}"


def _section(loc: tuple):
    cls = Config
    for name in loc:
        cls = typing.get_type_hints(cls)[name]
    return cls


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


def read_config_file(path: str) -> str:
    """A local path or any fsspec URL (hdfs://, s3a://, gs://): spark-submit's driver may run on a host that
    has only the cluster's storage."""
    try:
        fs, plain = filesystem(path)
        if fs.isfile(plain):
            with fs.open(plain, "rt", encoding="utf-8") as f:
                return f.read()
    except (ImportError, ValueError, OSError) as e:  # no filesystem for the scheme, or it cannot be reached
        raise ConfigError(f"config file {path} cannot be read ({type(e).__name__}: {e})") from e
    raise ConfigError(f"config file {path} does not exist")


def load(path: str | None = None, overrides: list[str] = (), flags: dict | None = None) -> Config:
    """The config from a YAML file (or the defaults), `--set` overrides, then explicit flags (dotted keys).

    A file may hold a `models:` section of tuned train settings per model name; those of the chosen
    train.model apply over the file's `train:` section and under `--set` and flags."""
    values: dict = {}
    if path:
        values = yaml.safe_load(read_config_file(path)) or {}
    per_model = values.pop("models", None) or {}
    models = choices(TrainConfig, "model")
    unknown = sorted(set(per_model) - set(models))
    if unknown:
        raise ConfigError(f"{path}: models.{unknown[0]} is not a model; known: {', '.join(models)}")
    later: dict = {}
    for text in overrides:
        later = _merge(later, parse_override(text))
    for key, value in (flags or {}).items():
        if value is not None:
            later = _merge(later, _nest(key, value))
    model = later.get("train", {}).get("model") or values.get("train", {}).get("model") or TrainConfig.model
    values = _merge(_merge(values, {"train": per_model.get(model) or {}}), later)
    return _build(values).validate()


def _nest(key: str, value) -> dict:
    # Spark's own keys are dotted: spark.conf.spark.sql.shuffle.partitions is one entry of spark.conf.
    parts = key.split(".", 2) if key.startswith("spark.conf.") else key.split(".")
    for part in reversed(parts):
        value = {part: value}
    return value

