"""spark-submit entry point: spark-submit jobs/predict.py [dmf predict options]."""
import sys

from pipeline.cli import main

# spark-submit chooses the master; the config's local default must not override it.
sys.exit(main(["predict", "--set", "spark.master=null", *sys.argv[1:]]))
