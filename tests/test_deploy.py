"""deploy/: the Airflow DAG loads in a DagBag and runs the README's spark-submit commands ("Scheduling"); the
spark-operator manifests parse and run the same entry points with the same arguments; the image installs with
deploy/install.sh and Horovod for NCCL."""
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_PYTHON = ROOT / ".venv-airflow" / "bin" / "python"
HOME = "/opt/dmf/"  # the checkout in the image (deploy/Dockerfile), and the DAG's default DMF_HOME
STAGES = ["prepare", "train", "evaluate", "recommend", "run"]


def readme_commands() -> list[list[str]]:
    """The spark-submit commands in README's Scheduling section, each as [application, *arguments], no --master."""
    section = (ROOT / "README.md").read_text().split("\n## Scheduling\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.splitlines():
        if line.strip().startswith("spark-submit "):
            words = shlex.split(line, comments=True)
            at = words.index("--master")
            commands.append(words[1:at] + words[at + 2:])
    return commands


def as_readme(application: str, arguments: list[str]) -> list[str]:
    """A deployed command written as the README writes it: paths relative to the checkout, the run id $RUN_ID."""
    words = [application.removeprefix("local://"), *arguments]
    return [w.removeprefix(HOME).replace("{{ ds }}", "$RUN_ID").replace("${RUN_ID}", "$RUN_ID") for w in words]


def per_stage() -> list[list[str]]:
    return [c for c in readme_commands() if "--run-id" in c]


def test_readme_lists_a_command_per_stage_and_the_whole_night():
    assert [Path(c[0]).stem for c in per_stage()] == STAGES
    assert ["jobs/run.py", "--config", "conf/cluster.example.yaml"] in readme_commands()
    for command in readme_commands():
        assert (ROOT / command[0]).is_file() and (ROOT / command[2]).is_file()


def test_airflow_dag_loads_and_runs_the_readme_commands(tmp_path):
    if not AIRFLOW_PYTHON.exists():
        pytest.fail(f"{AIRFLOW_PYTHON} is missing: `make airflow-venv` (deploy/airflow/install.sh) creates it")
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "DMF_HOME": HOME.rstrip("/")}
    out = tmp_path / "dagbag.json"
    subprocess.run([str(AIRFLOW_PYTHON), str(ROOT / "tests" / "airflow_dagbag.py"), str(ROOT / "deploy" / "airflow"),
                    str(out)], env=env, check=True, timeout=300, capture_output=True)
    bag = json.loads(out.read_text())
    assert bag["import_errors"] == {}
    dag = bag["dags"]["dmf_nightly"]
    assert list(bag["dags"]) == ["dmf_nightly"] and dag["max_active_runs"] == 1
    tasks = dag["tasks"]
    assert [t["task_id"] for t in tasks] == ["prepare", "train", "evaluate", "recommend", "gate"]
    assert [t["upstream"] for t in tasks] == [[], ["prepare"], ["train"], ["evaluate"], ["recommend"]]
    assert [as_readme(t["application"], t["application_args"]) for t in tasks] == per_stage()
    assert tasks[1]["conf"]["spark.task.resource.gpu.amount"] == "1"
    assert tasks[-1]["retries"] == 0  # a refused gate is not retried


def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        (doc,) = list(yaml.safe_load_all(path.read_text()))
        found[path.stem] = doc
    return found


def test_k8s_manifests_run_the_readme_commands():
    docs = manifests()
    assert sorted(docs) == ["evaluate", "gate", "nightly", "prepare", "recommend", "train"]
    commands = {}
    for name, doc in docs.items():
        assert doc["apiVersion"] == "sparkoperator.k8s.io/v1beta2"
        spec = doc["spec"]["template"] if doc["kind"] == "ScheduledSparkApplication" else doc["spec"]
        assert spec["type"] == "Python" and spec["mainApplicationFile"].startswith(f"local://{HOME}jobs/")
        commands[name] = as_readme(spec["mainApplicationFile"], spec["arguments"])
        gpu = spec["executor"].get("gpu")
        assert gpu == ({"name": "nvidia.com/gpu", "quantity": 1} if name in ("train", "nightly") else None), name
    assert [commands[s] for s in ("prepare", "train", "evaluate", "recommend", "gate")] == per_stage()
    nightly = docs["nightly"]
    assert nightly["kind"] == "ScheduledSparkApplication" and nightly["spec"]["concurrencyPolicy"] == "Forbid"
    assert commands["nightly"] == ["jobs/run.py", "--config", "conf/cluster.example.yaml"]
    assert {doc["kind"] for name, doc in docs.items() if name != "nightly"} == {"SparkApplication"}


def test_dockerfile_builds_on_cuda_with_the_ci_install_script():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in text and "cudnn-devel-ubuntu22.04" in text
    assert "python3.11" in text and "openjdk-17" in text
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in text and "./deploy/install.sh" in text
    assert '"\\[X\\] NCCL"' in text  # the build fails unless Horovod has NCCL
