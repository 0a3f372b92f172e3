"""Loads a DAG folder in Airflow's DagBag and writes JSON: import errors, and each DAG's tasks in order with
their spark-submit application and arguments (unrendered). Run by tests/test_deploy.py with .venv-airflow's
python (Airflow is not in .venv) and AIRFLOW_HOME in a scratch directory:
    python tests/airflow_dagbag.py DAG_FOLDER OUT.json
(a file, as Airflow logs to standard output)."""
import json
import sys

from airflow.models import DagBag

bag = DagBag(dag_folder=sys.argv[1], include_examples=False)
dags = {
    dag_id: {"schedule": str(dag.schedule_interval), "max_active_runs": dag.max_active_runs,
             "tasks": [{"task_id": t.task_id, "application": t.application, "application_args": t.application_args,
                        "conf": t.conf, "retries": t.retries, "upstream": sorted(t.upstream_task_ids)}
                       for t in dag.topological_sort()]}
    for dag_id, dag in bag.dags.items()
}
with open(sys.argv[2], "w") as f:
    json.dump({"import_errors": bag.import_errors, "dags": dags}, f, indent=2)
