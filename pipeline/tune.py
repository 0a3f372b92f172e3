"""dmf tune: a seeded search on the validation split over the settings that matter for one target, each trial
trained by the same ranks as `dmf train`; the best setting is written as a config file that `dmf train --config`
takes.

The search is Optuna's TPE sampler, seeded by train.seed, so the same command tries the same settings. The
target is the validation RMSE of the rating head (`rmse`, the settings of the rating tables) or the validation
NDCG@k of the ranking score (`ndcg`, the settings of the ranking tables), each as the trainer's best epoch
reports it.
"""
from __future__ import annotations

import math
import time

from pyspark.sql import SparkSession

from pipeline import config, storage
from pipeline.config import Config, ConfigError
from pipeline.storage import StageError
from pipeline.training import train

HEADER = "# dmf tune"
TARGETS = {"rmse": ("valid_rmse", "minimize"), "ndcg": ("valid_ndcg", "maximize")}


def suggest(trial, target: str, t: config.TrainConfig) -> dict:
    """The trial's settings, as dotted config keys."""
    if target == "ndcg":
        return {"train.ranking_dim": trial.suggest_categorical("train.ranking_dim", [32, 64, 128, 256]),
                "train.ranking_unobserved": trial.suggest_float("train.ranking_unobserved", 0.01, 3.0, log=True),
                "train.ranking_l2": trial.suggest_float("train.ranking_l2", 0.3, 100.0, log=True),
                "train.ranking_positives": trial.suggest_categorical("train.ranking_positives",
                                                                     ["above_mean", "all"])}
    dim = trial.suggest_categorical("train.user_dim", [32, 64, 128])
    # Ranges where MF's rating error is usually found; beyond them a trial diverges or underfits and only costs time.
    low, high = (0.01, 0.1) if t.optimizer in ("adagrad", "sgd") else (1e-4, 3e-3)
    values = {"train.user_dim": dim, "train.item_dim": dim,
              "train.lr": trial.suggest_float("train.lr", low, high, log=True),
              "train.l2": trial.suggest_float("train.l2", 0.02, 0.5, log=True),
              "train.bias_l2": trial.suggest_float("train.bias_l2", 0.005, 0.5, log=True)}
    if t.item_history:
        values["train.history_l2"] = trial.suggest_float("train.history_l2", 0.001, 0.05, log=True)
    if t.model != "mf":
        values["train.dropout"] = trial.suggest_float("train.dropout", 0.0, 0.6)
    return values


def tune(spark: SparkSession, cfg: Config, config_path: str | None, overrides: list[str], flags: dict,
         data_dir: str, out: str, target: str, trials: int, force: bool = False) -> dict:
    """Runs `trials` trainings and writes the best trial's whole config to `out` (a YAML file); returns a
    summary {target, best, trials: [...]}."""
    import optuna

    if target not in TARGETS:
        raise ConfigError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "ndcg" and not cfg.train.ranking_dim:
        raise ConfigError("--target ndcg tunes the ranking score, and train.ranking_dim is 0: set it above 0")
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    check_output(out, force)
    metric, direction = TARGETS[target]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=cfg.train.seed))
    work = cfg.path("tune", cfg.run)
    rows = []
    pick = min if direction == "minimize" else max

    def with_settings(values: dict, *extra: str) -> Config:
        return config.load(config_path, [*overrides, *(f"{k}={v}" for k, v in values.items()), *extra], flags)

    def objective(trial):
        values = suggest(trial, target, cfg.train)
        # An RMSE search trains no ranking tables (they cost time and leave the rating head as it is); the config
        # written at the end keeps the ranking settings it was given.
        speed = ["train.ranking_dim=0"] if target == "rmse" else []
        started = time.time()
        manifest = train.train(spark, with_settings(values, *speed), data_dir, f"{work}/trial-{trial.number}",
                               force=True)
        m = manifest["metrics"]
        if m[metric] is None:
            raise ConfigError(f"trial {trial.number + 1} reported no {metric}")
        rows.append({"trial": trial.number + 1, "settings": values, "valid_rmse": m["valid_rmse"],
                     "valid_ndcg": m.get("valid_ndcg"), "seconds": time.time() - started})
        best = pick((r[metric] for r in rows if math.isfinite(r[metric])), default=math.nan)  # Optuna fails NaN
        print(f"trial {trial.number + 1}/{trials}  {_settings(values)}  valid RMSE {m['valid_rmse']:.4f}"
              + (f"  NDCG@{m['k']} {m['valid_ndcg']:.4f}" if m.get("valid_ndcg") is not None else "")
              + f"  best {target} {best:.4f}  {time.time() - started:.0f} s", flush=True)
        return m[metric]

    try:
        study.optimize(objective, n_trials=trials)
    finally:
        fs_work, plain_work = storage.filesystem(work)
        if fs_work.exists(plain_work):
            fs_work.rm(plain_work, recursive=True)
    if not study.best_trials:
        raise StageError(f"no trial of {trials} gave a validation {target}: nothing was written to {out}")
    best = rows[study.best_trial.number]
    best_cfg = with_settings(best["settings"])
    header = (f"{HEADER} --target {target} --trials {trials}: the best of {trials} trials (trial {best['trial']}, "
              f"validation {target} {study.best_value:.4f})\n# on {data_dir}, from "
              f"{config_path or 'the built-in defaults'}{_given(overrides, flags)}.\n"
              f"# Train with: dmf train --config {out}\n")
    write_config(out, header, best_cfg)
    return {"target": target, "best": best, "value": study.best_value, "trials": rows, "out": out}


def check_output(out: str, force: bool) -> None:
    """A config file may be replaced when dmf tune wrote it or with --force; a directory never."""
    fs, plain = storage.filesystem(out)
    if fs.isdir(plain):
        raise StageError(f"{out} is a directory: --out names the config file to write")
    if fs.exists(plain) and not force and not fs.cat_file(plain).startswith(HEADER.encode()):
        raise StageError(f"{out} exists and is not a file dmf tune wrote: refusing to replace it; choose another "
                         f"--out, or give --force")


def write_config(out: str, header: str, cfg: Config) -> None:
    """The whole resolved config as YAML, under a header."""
    storage.replace_file(out, (header + config.dump(cfg)).encode())


def _given(overrides: list[str], flags: dict) -> str:
    given = [*overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    return f" with {' '.join(given)}" if given else ""


def _settings(values: dict) -> str:
    return " ".join(f"{k.split('.', 1)[1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                    for k, v in values.items() if k != "train.item_dim")


def summary(result: dict) -> str:
    best = result["best"]
    return (f"best of {len(result['trials'])} trials -> {result['out']}\n  trial {best['trial']}: "
            f"{_settings(best['settings'])}\n  validation {result['target']} {result['value']:.4f}")
