"""spark-submit entry point: spark-submit jobs/evaluate.py [dmf evaluate options]."""
import sys

from pipeline.cli import main

# spark-submit chooses the master; the config's local default must not override it.
sys.exit(main(["evaluate", "--set", "spark.master=null", *sys.argv[1:]]))
