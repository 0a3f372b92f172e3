"""`dmf <stage>`: every stage takes --config FILE and repeatable --set key=value; explicit flags win."""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline import config as config_mod
from pipeline.config import ConfigError
from pipeline.models.spec import KINDS
from pipeline.storage import StageError

log = logging.getLogger("pipeline")

# flag -> (config key, type, help)
COMMON = {
    "--work-dir": ("work_dir", str, "work directory holding runs/ (dmf run) and the stage commands' prepared/, "
                                    "models/, recommendations/, reports/"),
    "--dataset": ("dataset", str, "dataset name, used in default output paths"),
    "--run": ("run", str, "run name, used in default output paths"),
    "--run-id": ("schedule.run_id", str, "a dated run: outputs under work_dir/runs/RUN_ID/ (dmf run's default: "
                                         "today's UTC date; other commands: the work directory's paths)"),
    "--master": ("spark.master", str, "Spark master, e.g. local[2] (spark-submit sets its own)"),
}
STAGE_FLAGS = {
    "synth": {
        "--users": ("synth.users", int, "number of users"),
        "--items": ("synth.items", int, "number of items"),
        "--ratings": ("synth.ratings", int, "number of ratings"),
        "--rank": ("synth.rank", int, "rank of the planted user-item structure"),
        "--noise": ("synth.noise", float, "std of the rating noise"),
        "--seed": ("synth.seed", int, "random seed"),
        "--half-stars": ("synth.half_stars", bool, "ratings in half stars 0.5-5 instead of whole stars 1-5"),
    },
    "prepare": {
        "--input": ("prepare.input", str, "MovieLens directory or .zip, or one ratings file (u.data, ratings.dat, "
                                          "ratings.csv, Parquet)"),
        "--format": ("prepare.format", str, "auto (detected from the files), ml-100k, ml-1m, ml-10m, csv or parquet"),
        "--min-user-ratings": ("prepare.min_user_ratings", int,
                               "drop users with fewer ratings (repeated until stable)"),
        "--min-item-ratings": ("prepare.min_item_ratings", int,
                               "drop items with fewer ratings (repeated until stable)"),
        "--max-reject-fraction": ("prepare.max_reject_fraction", float,
                                  "fail when more input rows than this are invalid"),
        "--split": ("prepare.split.method", str, "random, user_fraction, user_temporal or global_time"),
        "--valid-fraction": ("prepare.split.fraction", float, "share of ratings for validation"),
        "--seed": ("prepare.split.seed", int, "split seed"),
    },
}
TRAIN_FLAGS = {
    "--model": ("train.model", str, ", ".join(KINDS)),
    "--num-proc": ("train.num_proc", int, "Horovod ranks (one per GPU on a cluster, CPU processes on a laptop)"),
    "--epochs": ("train.epochs", int, "maximum epochs (early stopping may end sooner)"),
    "--lr": ("train.lr", float, "learning rate for one rank"),
    "--batch-size": ("train.batch_size", int, "batch size per rank"),
    "--init-from": ("train.init_from", str, "model directory (e.g. an mf) whose parameters of the same name "
                                            "and shape this model starts from"),
}
STAGE_FLAGS["train"] = TRAIN_FLAGS
STAGE_FLAGS["evaluate"] = {"--k": ("evaluate.k", int, "cut-off of the ranking metrics"),
                           "--relevant-rating": ("evaluate.relevant_rating", float,
                                                 "validation ratings at or above this are relevant")}
STAGE_FLAGS["recommend"] = {"--top-n": ("recommend.top_n", int, "recommendations per user (1-1000)"),
                            "--output-format": ("recommend.format", str, "parquet or csv"),
                            "--candidates": ("recommend.candidates", int, "two-stage: retrieve this many unseen items "
                                                                          "per user by dot product, re-rank with the "
                                                                          "model (0: score every item)")}
STAGE_FLAGS["tune"] = {"--model": TRAIN_FLAGS["--model"], "--num-proc": TRAIN_FLAGS["--num-proc"],
                       "--epochs": TRAIN_FLAGS["--epochs"]}
STAGE_FLAGS["predict"] = {}
STAGE_FLAGS["similar"] = {}
STAGE_FLAGS["current"] = {}
PUBLISH_FLAGS = {
    "--db-url": ("publish.db_url", str, "postgresql://USER@HOST:PORT/DB; the password comes from PGPASSWORD or "
                                        "~/.pgpass, never from the URL"),
    "--table": ("publish.table", str, "the table the login path reads (schema.table allowed)"),
}
STAGE_FLAGS["publish"] = {**PUBLISH_FLAGS,
                          "--similar": ("publish.similar", bool, "also publish each item's most similar items"),
                          "--similar-table": ("publish.similar_table", str, "their table (default TABLE_similar)"),
                          "--similar-k": ("publish.similar_k", int, "similar items per item")}
STAGE_FLAGS["lookup"] = PUBLISH_FLAGS
STAGE_FLAGS["run"] = {flag: STAGE_FLAGS["prepare"][flag] for flag in ("--input", "--format")} | TRAIN_FLAGS | \
    STAGE_FLAGS["recommend"]
# One meaning per flag in every command: --model names a model kind (train, run), --model-dir a trained model's
# directory, --format the input's format (prepare, run), --output-format the lists'. The old spellings still
# work for one release, with a message: command -> {old flag: new flag}.
RENAMED = {**{name: {"--model": "--model-dir"} for name in ("evaluate", "recommend", "predict", "similar", "publish")},
           "recommend": {"--model": "--model-dir", "--retrieval-model": "--retrieval-model-dir",
                         "--format": "--output-format"}}
HELP = {
    "synth": "generate MovieLens-shaped ratings with a planted low-rank structure",
    "prepare": "ingest, validate, split and remap ratings into Parquet for training",
    "train": "train a model on a prepared data set with Horovod ranks",
    "evaluate": "rating error and full-catalog ranking quality of a model on the validation split",
    "recommend": "top-N unseen items for every user, in the original ids",
    "tune": "search the settings that matter for one target (validation RMSE or NDCG) with seeded Optuna trials, "
            "each trained like dmf train; write the best as a config file for dmf train --config",
    "predict": "score given (user, item) pairs",
    "similar": "nearest items to one item in embedding space",
    "run": "the whole pipeline into work_dir/runs/RUN_ID/: synth (or --input), prepare, train, evaluate, "
           "recommend; then the gate, and CURRENT moves to the run if it passes",
    "publish": "load a recommend output into PostgreSQL (and a most-popular fallback, and with --similar each "
               "item's similar items), swapped in by one transaction",
    "lookup": "print one user's published recommendations, or the most-popular fallback for an unknown user",
    "current": "print the run work_dir/runs/CURRENT points at, or point it at an earlier good run (--set ID)",
}


LOG_LEVEL = {"type": str.upper, "choices": ("DEBUG", "INFO", "WARNING", "ERROR"),
             "help": "this package's logging level (default INFO)"}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dmf", description="Deep matrix factorization recommender on Spark and Horovod.")
    top.add_argument("--log-level", default="INFO", **LOG_LEVEL)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, flags in STAGE_FLAGS.items():
        p = commands.add_parser(name, help=HELP[name], description=HELP[name])
        # After the command name too (jobs/ put theirs there); SUPPRESS leaves the top-level value unless given.
        p.add_argument("--log-level", default=argparse.SUPPRESS, **LOG_LEVEL)
        p.add_argument("--config", help="YAML config (see conf/); without one, the built-in defaults")
        p.add_argument("--print-config", action="store_true",
                       help="print the config this command would run with (file, --set and flags resolved) and exit")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key, e.g. --set train.lr=0.005 (repeatable)")
        _command_options(p, name)
        common = {"--work-dir": COMMON["--work-dir"]} if name == "current" else COMMON
        for flag, (key, kind, text) in {**common, **flags}.items():
            dest = "cfg__" + key.replace(".", "__")
            metavar = flag.lstrip("-").upper().replace("-", "_")
            if kind is bool:
                p.add_argument(flag, dest=dest, action="store_const", const=True, help=f"{text} [{key}]")
            else:
                p.add_argument(flag, dest=dest, type=kind, metavar=metavar, help=f"{text} [{key}]")
        for old in RENAMED.get(name, {}):
            p.add_argument(old, dest=f"renamed__{old}", help=argparse.SUPPRESS)
    return top


def _command_options(p: argparse.ArgumentParser, name: str) -> None:
    """The options that only some commands take: outputs, inputs, and each command's own."""
    if name == "current":
        p.add_argument("--to", dest="point_at", metavar="RUN_ID",
                       help="point CURRENT at this run (complete, and passed its gate): a rollback")
    if name == "tune":
        p.add_argument("--out", help="the config file to write (default work_dir/tuned/RUN-TARGET.yaml)")
    elif name not in ("run", "similar", "current", "publish", "lookup"):
        p.add_argument("--out", help="output directory (default under the work directory)")
    if name == "run":
        p.add_argument("--redo", action="store_true",
                       help="run every stage again, replacing the run's outputs (default: skip the stages "
                            "whose output in the run is complete)")
    if name not in ("similar", "current", "publish", "lookup"):
        p.add_argument("--force", action="store_true",
                       help="replace an output directory that is not an earlier output of this stage (a plain "
                            "file is never replaced); without it such a path is refused before any work")
    if name not in ("synth", "prepare", "run", "current", "publish", "lookup"):
        p.add_argument("--data", help="prepared data directory (default: work_dir/prepared/DATASET, or the "
                                      "one the model was trained on)")
    if name in ("evaluate", "recommend", "predict", "similar"):
        p.add_argument("--model-dir", help="trained model directory (default: work_dir/models/RUN)")
    if name == "publish":
        p.add_argument("--recs", help="recommend output directory (default: the run's, or "
                                      "work_dir/recommendations/RUN)")
        p.add_argument("--model-dir", help="model whose similar items to publish (implies --similar; "
                                           "default: the one the recommendations came from)")
    if name == "lookup":
        p.add_argument("--user", type=int, required=True, help="original user id")
    if name == "recommend":
        p.add_argument("--retrieval-model-dir",
                       help="two-stage: the mf or two_tower model that retrieves candidates (default: the model "
                            "itself, which must then be mf or two_tower)")
    if name == "tune":
        p.add_argument("--target", choices=("rmse", "ndcg"), default="rmse",
                       help="what the search improves: the rating head's validation RMSE or the ranking score's "
                            "validation NDCG@k (default rmse)")
        p.add_argument("--trials", type=int, default=20, help="trainings to run (default 20)")
    if name == "train":
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of a stopped run")
    if name == "predict":
        p.add_argument("--pairs", required=True, help="CSV with userId,movieId or Parquet with user_id,item_id")
    if name == "similar":
        p.add_argument("--item", type=int, required=True, help="original item id")
        p.add_argument("--n", type=int, default=10, help="how many neighbours (default 10)")


def renamed_flags(args) -> list[str]:
    """Moves the values given under old spellings (RENAMED) to the new flags; one message for each."""
    messages = []
    for old, new in RENAMED.get(args.command, {}).items():
        value = getattr(args, f"renamed__{old}", None)
        if value is None:
            continue
        flag = STAGE_FLAGS[args.command].get(new)
        dest = "cfg__" + flag[0].replace(".", "__") if flag else new.lstrip("-").replace("-", "_")
        if getattr(args, dest) is None:
            setattr(args, dest, value)
        messages.append(f"dmf {args.command}: {old} is now {new} (the old spelling goes in the next release)")
    return messages


def command_flags(args) -> dict:
    """The config keys the command's explicit flags set: {"train.model": "dmf", ...} (None where not given)."""
    return {k[len("cfg__"):].replace("__", "."): v for k, v in vars(args).items() if k.startswith("cfg__")}


def load_config(args) -> config_mod.Config:
    return config_mod.load(args.config, args.set, command_flags(args))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for message in renamed_flags(args):
        print(message, file=sys.stderr)
    # --log-level applies to this package; other libraries log warnings only. py4j logs through the root
    # logger, at INFO with a traceback, each pooled connection that Horovod's driver has hung up on: harmless.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(args.log_level)
    try:
        cfg = load_config(args)
        if args.print_config:
            print(config_mod.dump(cfg), end="")
            return 0
        from pipeline import stages  # imports Spark; kept out of --help and config errors

        print(stages.COMMANDS[args.command](cfg, args))
        return 0
    except ConfigError as e:
        print(f"dmf {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"dmf {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
