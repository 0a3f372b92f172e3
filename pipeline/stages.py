"""What each `dmf` command does: build the Spark session, call the stage function, say what was written."""
from __future__ import annotations

from pipeline import runs
from pipeline.cli import command_flags
from pipeline.config import Config
from pipeline.data import prepare as prepare_mod
from pipeline.spark import session
from pipeline.storage import StageError


def _where(cfg: Config, given: str | None, stage: str, *default: str) -> str:
    """A stage's path: the one given, else that stage's directory in the run --run-id names, else the work
    directory's default (e.g. "models", cfg.run)."""
    if given:
        return given
    if cfg.schedule.run_id:
        return runs.stage_dir(cfg, runs.run_id(cfg), stage)
    return cfg.path(*default)


def _spark(cfg: Config):
    """The session; in local mode with a database to publish to, with the PostgreSQL JDBC jar on its classpath
    (spark-submit takes --jars). It must be set before the first session starts, hence in every stage."""
    conf = cfg.spark
    if cfg.publish.db_url and (conf.master or "").startswith("local") and "spark.jars" not in conf.conf:
        from pipeline.publish import jdbc_jar

        if jar := jdbc_jar():
            conf.conf["spark.jars"] = jar
    return session(conf)


def synth(cfg: Config, args) -> str:
    from pipeline.data import synth as synth_mod

    out = _where(cfg, getattr(args, "out", None), "synth", "synth", cfg.dataset)
    manifest = synth_mod.generate(_spark(cfg), cfg.synth, out, force=_force(args))
    return (f"synthetic ratings -> {out}\n  {manifest['counts']['ratings']:,} ratings, "
            f"oracle RMSE {manifest['oracle_rmse']:.4f}")


def prepare(cfg: Config, args) -> str:
    out = _where(cfg, getattr(args, "out", None), "prepare", "prepared", cfg.dataset)
    manifest = prepare_mod.prepare(_spark(cfg), cfg, cfg.prepare.input, out, force=_force(args))
    return prepare_mod.summary(manifest, out)


def train(cfg: Config, args) -> str:
    from pipeline.training import train as train_mod

    data = _where(cfg, getattr(args, "data", None), "prepare", "prepared", cfg.dataset)
    out = _where(cfg, getattr(args, "out", None), "train", "models", cfg.run)
    manifest = train_mod.train(_spark(cfg), cfg, data, out, resume=getattr(args, "resume", False),
                               force=_force(args))
    return train_mod.summary(manifest, out)


def tune(cfg: Config, args) -> str:
    from pipeline import tune as tune_mod

    data = _where(cfg, getattr(args, "data", None), "prepare", "prepared", cfg.dataset)
    out = args.out or cfg.path("tuned", f"{cfg.run}-{args.target}.yaml")
    result = tune_mod.tune(_spark(cfg), cfg, args.config, args.set, command_flags(args), data, out, args.target,
                           args.trials, force=_force(args))
    return tune_mod.summary(result)


def _force(args) -> bool:
    return getattr(args, "force", False)


def _model_dir(cfg: Config, args) -> str:
    return _where(cfg, getattr(args, "model_dir", None), "train", "models", cfg.run)


def evaluate(cfg: Config, args) -> str:
    from pipeline import evaluate as evaluate_mod

    out = _where(cfg, getattr(args, "out", None), "evaluate", "reports", cfg.run)
    manifest = evaluate_mod.evaluate(_spark(cfg), cfg, _model_dir(cfg, args), getattr(args, "data", None), out,
                                     force=_force(args))
    return f"evaluation -> {out}/metrics.json (and pictures)\n{evaluate_mod.table(manifest)}"


def recommend(cfg: Config, args) -> str:
    from pipeline import recommend as recommend_mod

    out = _where(cfg, getattr(args, "out", None), "recommend", "recommendations", cfg.run)
    manifest = recommend_mod.recommend(_spark(cfg), cfg, _model_dir(cfg, args), getattr(args, "data", None), out,
                                       retrieval_model_dir=getattr(args, "retrieval_model_dir", None),
                                       force=_force(args))
    return recommend_mod.summary(manifest, out)


def predict(cfg: Config, args) -> str:
    from pipeline import predict as predict_mod

    out = args.out or cfg.path("predictions", cfg.run)
    manifest = predict_mod.predict(_spark(cfg), _model_dir(cfg, args), args.pairs, out, args.data,
                                   force=_force(args))
    c = manifest["counts"]
    return (f"predictions -> {out}/predictions\n  {c['rows']:,} rows: {c['known']:,} scored by the model, "
            f"{c['fallback']:,} by the fallback (user or item not in training), {c['malformed']:,} malformed")


def similar(cfg: Config, args) -> str:
    from pipeline import similar as similar_mod

    table = similar_mod.similar(_model_dir(cfg, args), args.item, args.n, args.data)
    return table.to_string(index=False)


def _db_url(cfg: Config) -> str:
    if not cfg.publish.db_url:
        raise StageError("no database given: pass --db-url postgresql://USER@HOST:PORT/DB or set publish.db_url")
    return cfg.publish.db_url


def publish(cfg: Config, args) -> str:
    from pipeline import publish as publish_mod
    from pipeline import storage

    p = cfg.publish
    db_url = _db_url(cfg)
    recs = _where(cfg, getattr(args, "recs", None), "recommend", "recommendations", cfg.run)
    model = getattr(args, "model_dir", None)
    if p.similar and not model:
        model = storage.read_manifest(recs, "recommend")["model"]
    result = publish_mod.publish(_spark(cfg), recs, db_url, p.table, model_dir=model, similar_table=p.similar_table,
                                 similar_k=p.similar_k, run_id=cfg.schedule.run_id or cfg.run, writers=p.writers)
    return publish_mod.summary(result)


def lookup(cfg: Config, args) -> str:
    from pipeline import publish as publish_mod

    return publish_mod.show(_db_url(cfg), cfg.publish.table, args.user)


def run(cfg: Config, args) -> str:
    """Every stage into runs/ID/, skipping those already complete there (unless --redo); then the gate, and
    CURRENT moves to this run only if it passes; then retention. A refused gate fails the command."""
    rid = cfg.schedule.run_id = runs.run_id(cfg)
    redo = getattr(args, "redo", False)
    with runs.lock(cfg, rid):
        if redo and runs.current(cfg) == rid:
            raise StageError(f"run {rid} is the one CURRENT points at, which consumers read: --redo would replace "
                             f"it in place. Point CURRENT at another run first (dmf current --to ID), or use a "
                             f"new --run-id")
        lines = [f"run {rid} -> {runs.run_dir(cfg, rid)}"]
        steps = [("prepare", prepare), ("train", train), ("evaluate", evaluate), ("recommend", recommend)]
        if not cfg.prepare.input:
            cfg.prepare.input = runs.stage_dir(cfg, rid, "synth")
            if redo or not runs.done(runs.stage_dir(cfg, rid, "prepare"), "prepare"):  # prepare alone reads it
                steps.insert(0, ("synth", synth))
        ran = False  # once a stage runs, every later one does: their outputs derive from it
        for stage, command in steps:
            out = runs.stage_dir(cfg, rid, stage)
            if not (redo or ran) and runs.done(out, stage):
                lines.append(f"{stage}: {out} is complete, skipped (--redo runs it again)")
                continue
            lines.append(command(cfg, args))
            ran = True
        verdict = runs.gate(cfg, rid)
        lines.append(runs.summary(verdict))
        if verdict["passed"] and runs.current(cfg) != rid:
            runs.point_at(cfg, rid, "dmf run: gate passed")
        if verdict["passed"] and cfg.publish.db_url:  # the login path follows CURRENT
            lines.append(publish(cfg, args))
        removed = runs.prune(cfg)
        if removed:
            lines.append(f"retention: removed {', '.join(removed)} (schedule.keep_runs={cfg.schedule.keep_runs})")
        lines.append(f"CURRENT -> {runs.current(cfg)} ({runs.root(cfg)}/{runs.POINTER})")
    if not verdict["passed"]:
        print("\n".join(lines))
        raise StageError(f"the gate refused run {rid}: {'; '.join(verdict['reasons'])}. CURRENT still points at "
                         f"{runs.current(cfg)}; {runs.run_dir(cfg, rid)}/{runs.GATE} has the verdict")
    return "\n".join(lines)


def current(cfg: Config, args) -> str:
    if args.point_at:
        with runs.lock(cfg, args.point_at):
            runs.rollback(cfg, args.point_at)
    rid = runs.current(cfg)
    if rid is None:
        return f"{runs.root(cfg)}/{runs.POINTER} does not exist yet: no run has passed its gate"
    return f"CURRENT -> {rid} ({runs.run_dir(cfg, rid)})"


COMMANDS = {"synth": synth, "prepare": prepare, "train": train, "evaluate": evaluate, "recommend": recommend,
            "predict": predict, "similar": similar, "run": run, "current": current,
            "publish": publish, "lookup": lookup, "tune": tune}
