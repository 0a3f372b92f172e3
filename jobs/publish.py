"""spark-submit entry point: spark-submit --jars /path/postgresql-42.7.13.jar jobs/publish.py [dmf publish options].

The JDBC driver must reach the driver and the executors: --jars PATH, or --packages org.postgresql:postgresql:42.7.13.
The password comes from PGPASSWORD or ~/.pgpass on the host that runs the Spark driver, never from the URL."""
import sys

from pipeline.cli import main

# spark-submit chooses the master; the config's local default must not override it.
sys.exit(main(["publish", "--set", "spark.master=null", *sys.argv[1:]]))
