"""spark-submit entry point: spark-submit jobs/recommend.py [dmf recommend options]."""
import sys

from pipeline.cli import main

# spark-submit chooses the master; the config's local default must not override it.
sys.exit(main(["recommend", "--set", "spark.master=null", *sys.argv[1:]]))
