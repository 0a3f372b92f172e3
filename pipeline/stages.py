"""What each `dmf` command does: build the Spark session, call the stage function, say what was written."""
from __future__ import annotations

from pipeline import prepare as prepare_mod
from pipeline.config import Config
from pipeline.spark import session


def synth(cfg: Config, args) -> str:
    from pipeline import synth as synth_mod

    out = getattr(args, "out", None) or cfg.path("synth", cfg.dataset)
    manifest = synth_mod.generate(session(cfg.spark), cfg.synth, out)
    return (f"synthetic ratings -> {out}\n  {manifest['counts']['ratings']:,} ratings, "
            f"oracle RMSE {manifest['oracle_rmse']:.4f}")


def prepare(cfg: Config, args) -> str:
    out = getattr(args, "out", None) or cfg.path("prepared", cfg.dataset)
    manifest = prepare_mod.prepare(session(cfg.spark), cfg, cfg.prepare.input, out)
    return prepare_mod.summary(manifest, out)


def train(cfg: Config, args) -> str:
    from pipeline import train as train_mod

    data = getattr(args, "data", None) or cfg.path("prepared", cfg.dataset)
    out = getattr(args, "out", None) or cfg.path("models", cfg.run)
    manifest = train_mod.train(session(cfg.spark), cfg, data, out, resume=getattr(args, "resume", False))
    return train_mod.summary(manifest, out)


def run(cfg: Config, args) -> str:
    lines = []
    if not cfg.prepare.input:
        lines.append(synth(cfg, args))
        cfg.prepare.input = cfg.path("synth", cfg.dataset)
    lines.append(prepare(cfg, args))
    lines.append(train(cfg, args))
    return "\n".join(lines)


COMMANDS = {"synth": synth, "prepare": prepare, "train": train, "run": run}
