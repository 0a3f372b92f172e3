"""spark-submit entry point: spark-submit jobs/run.py [--run-id ID] [dmf run options].

Every stage into work_dir/runs/ID/, then the gate and CURRENT. Given an ID whose stages are all complete (the
per-stage jobs ran them), it only checks the gate, moves CURRENT and applies retention."""
import sys

from pipeline.cli import main

# spark-submit chooses the master; the config's local default must not override it.
sys.exit(main(["run", "--set", "spark.master=null", *sys.argv[1:]]))
