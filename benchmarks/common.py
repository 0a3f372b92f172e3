"""What the benchmark scripts share: the ML-20M-sized synthetic set, a description of the machine, the command line
that ran, and the templates of their documents."""
from __future__ import annotations

import os
import platform
import shlex
import string
import sys
from pathlib import Path

import psutil
import torch

from pipeline import config, storage
from pipeline.data import prepare, synth

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "work" / "bench"


def ml20m_sized(spark, ratings: int, work: str = str(WORK)) -> str:
    """A prepared synthetic set on an ML-20M-sized catalog (138,000 users, 27,000 items), made once."""
    cfg = config.load(overrides=[f"synth.ratings={ratings}", "synth.users=138000", "synth.items=27000",
                                 "synth.rank=16", "prepare.max_ranks=8"])
    raw, prepared = f"{work}/synth-138k-27k-{ratings}", f"{work}/prepared-138k-27k-{ratings}"
    if not storage.exists(f"{prepared}/manifest.json"):
        if not storage.exists(f"{raw}/manifest.json"):
            synth.generate(spark, cfg.synth, raw)
        prepare.prepare(spark, cfg, raw, prepared)
    return prepared


def machine() -> str:
    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU only"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {device}; load average {os.getloadavg()[0]:.1f} "
            f"at the start (the machine is shared: compare ratios within one run)")


def command(module: str) -> str:
    """The command line that ran this benchmark, for its document: `.venv/bin/python -m benchmarks.NAME ...`."""
    return shlex.join([".venv/bin/python", "-m", f"benchmarks.{module}", *sys.argv[1:]])


def render(template: str, **values: str) -> str:
    """A document of benchmarks/templates/, its $names replaced by the values."""
    return string.Template((ROOT / "benchmarks" / "templates" / template).read_text()).substitute(values)
