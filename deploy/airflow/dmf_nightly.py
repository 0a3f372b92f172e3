"""Airflow DAG: the pipeline every night, one spark-submit per stage into runs/<date>/, then the gate.

Each task runs a README command ("Scheduling"; tests/test_deploy.py compares them): jobs/STAGE.py with the
cluster config and --run-id {{ ds }}, the night's date, so that every task reads and writes the same run.
The last task, jobs/run.py, finds every stage complete and only checks the gate, moves runs/CURRENT if it
passes (it fails the DAG run if not) and removes runs beyond schedule.keep_runs. max_active_runs=1 keeps
two nights apart: the stage jobs take no lock, jobs/run.py does.

DMF_HOME is where the checkout lies on the Airflow workers (spark-submit runs there; the Spark connection,
spark_default, names the cluster).
"""
import os

import pendulum
from airflow import DAG
from airflow.models.baseoperator import chain
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

DMF_HOME = os.environ.get("DMF_HOME", "/opt/dmf")
CONFIG = f"{DMF_HOME}/conf/cluster.example.yaml"
# One Horovod rank per GPU (conf/cluster.example.yaml: train.num_proc 4); the cluster names its discovery script.
GPU = {"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1"}

with DAG(
    dag_id="dmf_nightly",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": pendulum.duration(minutes=10)},
    tags=["dmf"],
) as dag:
    stages = [
        SparkSubmitOperator(task_id=stage, name=f"dmf-{stage}", conn_id="spark_default",
                            application=f"{DMF_HOME}/jobs/{stage}.py",
                            application_args=["--config", CONFIG, "--run-id", "{{ ds }}"],
                            conf=GPU if stage == "train" else None)
        for stage in ("prepare", "train", "evaluate", "recommend")
    ]
    # A refused gate is a verdict on the run, not a failure that a retry would change.
    gate = SparkSubmitOperator(task_id="gate", name="dmf-gate", conn_id="spark_default",
                               application=f"{DMF_HOME}/jobs/run.py",
                               application_args=["--config", CONFIG, "--run-id", "{{ ds }}"], retries=0)
    chain(*stages, gate)
