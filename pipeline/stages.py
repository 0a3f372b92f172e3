"""What each `dmf` command does: build the Spark session, call the stage function, say what was written."""
from __future__ import annotations

from pipeline import prepare as prepare_mod
from pipeline.config import Config
from pipeline.spark import session


def synth(cfg: Config, args) -> str:
    from pipeline import synth as synth_mod

    out = getattr(args, "out", None) or cfg.path("synth", cfg.dataset)
    manifest = synth_mod.generate(session(cfg.spark), cfg.synth, out, force=_force(args))
    return (f"synthetic ratings -> {out}\n  {manifest['counts']['ratings']:,} ratings, "
            f"oracle RMSE {manifest['oracle_rmse']:.4f}")


def prepare(cfg: Config, args) -> str:
    out = getattr(args, "out", None) or cfg.path("prepared", cfg.dataset)
    manifest = prepare_mod.prepare(session(cfg.spark), cfg, cfg.prepare.input, out, force=_force(args))
    return prepare_mod.summary(manifest, out)


def train(cfg: Config, args) -> str:
    from pipeline import train as train_mod

    data = getattr(args, "data", None) or cfg.path("prepared", cfg.dataset)
    out = getattr(args, "out", None) or cfg.path("models", cfg.run)
    manifest = train_mod.train(session(cfg.spark), cfg, data, out, resume=getattr(args, "resume", False),
                               force=_force(args))
    return train_mod.summary(manifest, out)


def _force(args) -> bool:
    return getattr(args, "force", False)


def _model_dir(cfg: Config, args) -> str:
    return getattr(args, "model_dir", None) or cfg.path("models", cfg.run)


def evaluate(cfg: Config, args) -> str:
    from pipeline import evaluate as evaluate_mod

    out = getattr(args, "out", None) or cfg.path("reports", cfg.run)
    manifest = evaluate_mod.evaluate(session(cfg.spark), cfg, _model_dir(cfg, args), getattr(args, "data", None), out,
                                     force=_force(args))
    return f"evaluation -> {out}/metrics.json (and pictures)\n{evaluate_mod.table(manifest)}"


def recommend(cfg: Config, args) -> str:
    from pipeline import recommend as recommend_mod

    out = getattr(args, "out", None) or cfg.path("recommendations", cfg.run)
    manifest = recommend_mod.recommend(session(cfg.spark), cfg, _model_dir(cfg, args), getattr(args, "data", None), out,
                                       retrieval_model_dir=getattr(args, "retrieval_model_dir", None),
                                       force=_force(args))
    return recommend_mod.summary(manifest, out)


def predict(cfg: Config, args) -> str:
    from pipeline import predict as predict_mod

    out = args.out or cfg.path("predictions", cfg.run)
    manifest = predict_mod.predict(session(cfg.spark), _model_dir(cfg, args), args.pairs, out, args.data,
                                   force=_force(args))
    c = manifest["counts"]
    return (f"predictions -> {out}/predictions\n  {c['rows']:,} rows: {c['known']:,} scored by the model, "
            f"{c['fallback']:,} by the fallback (user or item not in training), {c['malformed']:,} malformed")


def similar(cfg: Config, args) -> str:
    from pipeline import predict as predict_mod

    table = predict_mod.similar(_model_dir(cfg, args), args.item, args.n, args.data)
    return table.to_string(index=False)


def run(cfg: Config, args) -> str:
    lines = []
    if not cfg.prepare.input:
        lines.append(synth(cfg, args))
        cfg.prepare.input = cfg.path("synth", cfg.dataset)
    lines.append(prepare(cfg, args))
    lines.append(train(cfg, args))
    lines.append(evaluate(cfg, args))
    lines.append(recommend(cfg, args))
    return "\n".join(lines)


COMMANDS = {"synth": synth, "prepare": prepare, "train": train, "evaluate": evaluate, "recommend": recommend,
            "predict": predict, "similar": similar, "run": run}
