"""Cluster pieces that need no running cluster: cluster.yaml, address kinds, the job's command line, flags."""
import json
import os
from pathlib import Path

import pytest
import yaml

from compsearch.search.cli import _parser
from compsearch.search.cluster import IN_JOB_ENV, is_jobs_address, job_argv, jobs_client, use_token_auth
from compsearch.search.errors import UserError
from compsearch.search.runner import WorkerResources

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_the_launchers_own_schema(cluster_config):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster_config, schema)
    validate_config(prepare_config(cluster_config))  # what `ray up` does before it starts anything


def test_cluster_yaml_has_a_head_and_an_autoscaling_gpu_group_that_install_the_project(cluster_config):
    types = cluster_config["available_node_types"]
    assert cluster_config["head_node_type"] in types
    assert cluster_config["provider"]["type"] and cluster_config["auth"]["ssh_user"]
    gpu_groups = [spec for spec in types.values() if spec["resources"].get("GPU", 0) > 0]
    assert gpu_groups, "no node type offers GPUs"
    for spec in gpu_groups:
        assert 0 <= spec["min_workers"] < spec["max_workers"] <= cluster_config["max_workers"]
        assert spec["node_config"]
    assert any(path == "." for path in cluster_config["file_mounts"].values())  # the project is shipped
    assert any("install.sh" in command for command in cluster_config["setup_commands"])
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start  # the Jobs API is reached over `ray dashboard`
    assert "$RAY_HEAD_IP" in " ".join(cluster_config["worker_start_ray_commands"])


@pytest.mark.parametrize("address, jobs", [
    ("http://127.0.0.1:8265", True), ("https://head.example:8265", True), ("auto", False),
    ("ray://head:10001", False), ("10.0.0.5:6379", False), (None, False), ("", False)])
def test_jobs_api_addresses_are_told_from_cluster_addresses(address, jobs):
    assert is_jobs_address(address) is jobs


def test_the_job_runs_the_same_command_with_address_auto_and_absolute_paths(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    argv = ["submit", "--study", "big", "--address", "http://127.0.0.1:8265", "--model", "models/tiny",
            "--data=notes.txt", "--storage", "journal:shared/big.log", "--trials", "5", "--gpus-per-worker", "0.5",
            "--config", "job.yaml", "--gguf-template=base.gguf", "--task-path", "tasks/a", "--task-path", "tasks/b"]
    out = job_argv(argv, cwd=tmp_path)
    for flag, path in (("--config", "job.yaml"), ("--gguf-template", "base.gguf")):
        assert out[out.index(flag) + 1] == str(tmp_path / path)
    assert [out[i + 1] for i, token in enumerate(out) if token == "--task-path"] == [
        str(tmp_path / "tasks" / "a"), str(tmp_path / "tasks" / "b")]
    assert out[:3] == ["submit", "--study", "big"] and out[-2:] == ["--address", "auto"]
    assert "http://127.0.0.1:8265" not in out
    assert out[out.index("--model") + 1] == str(tmp_path / "models" / "tiny")
    assert out[out.index("--data") + 1] == str(tmp_path / "notes.txt")
    assert out[out.index("--storage") + 1] == f"journal:{tmp_path / 'shared' / 'big.log'}"
    assert out[out.index("--results-dir") + 1] == str(tmp_path / "results")
    assert out[out.index("--gpus-per-worker") + 1] == "0.5"
    hub_model = job_argv(["submit", "--model", "HuggingFaceTB/SmolLM2-135M", "--address=http://h:8265"], cwd=tmp_path)
    assert hub_model[hub_model.index("--model") + 1] == "HuggingFaceTB/SmolLM2-135M"  # an id, not a path here
    postgres = "postgresql://user@db:5432/compsearch"
    assert job_argv(["resume", "--storage", postgres], cwd=tmp_path)[2] == postgres


def test_token_auth_is_turned_on_only_when_a_token_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "")  # records the original value, restored after the test
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    use_token_auth()
    assert "RAY_AUTH_MODE" not in os.environ
    (tmp_path / "token").write_text("secret")
    use_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    use_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # an explicit choice is kept


def test_a_driver_inside_a_ray_job_does_not_submit_another_job(monkeypatch):
    monkeypatch.setenv(IN_JOB_ENV, "1")
    with pytest.raises(UserError, match="already runs inside a Ray job"):
        jobs_client("http://127.0.0.1:8265")


def test_an_address_without_a_jobs_api_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(IN_JOB_ENV, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # Ray's default for new clusters; nothing leaks out of the test
    with pytest.raises(UserError, match=r"no Ray Jobs API answers at http://127.0.0.1:9.*http://HEAD:8265"):
        jobs_client("http://127.0.0.1:9")


def test_worker_resource_flags():
    args = _parser().parse_args(["submit", "--study", "s", "--trials", "4", "--gpus-per-worker", "0.5",
                                 "--worker-resources", '{"node_b": 1}'])
    assert args.gpus_per_worker == 0.5 and args.worker_resources == {"node_b": 1.0}
    with pytest.raises(SystemExit):
        _parser().parse_args(["submit", "--study", "s", "--trials", "4", "--worker-resources", "node_b=1"])
    asked = WorkerResources(2, 0.5, {"node_b": 1.0})
    assert asked.asked() == {"CPU": 2, "GPU": 0.5, "node_b": 1.0}
    assert asked.actor_options() == {"num_cpus": 2, "num_gpus": 0.5, "resources": {"node_b": 1.0}, "max_restarts": 0}
