"""spark-submit entry point: spark-submit jobs/train.py --data PREPARED --out MODEL_DIR [dmf train options]."""
import sys

from pipeline.cli import main

# spark-submit chooses the master; the config's local default must not override it.
sys.exit(main(["train", "--set", "spark.master=null", *sys.argv[1:]]))
