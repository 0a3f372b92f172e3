"""spark-submit entry point: spark-submit jobs/prepare.py --input PATH --out DIR [dmf prepare options]."""
import sys

from pipeline.cli import main

# spark-submit chooses the master; the config's local default must not override it.
sys.exit(main(["prepare", "--set", "spark.master=null", *sys.argv[1:]]))
