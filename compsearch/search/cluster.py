"""Studies as Ray jobs: telling address kinds apart, submitting through the Jobs API, and the job's state.

Two kinds of `--address`:
- a Jobs API address, `http://HEAD:8265` (the head's dashboard port): the driver itself runs on the
  cluster as a Ray job; `submit`/`resume` return the job id at once.
- a cluster address, `ray://HEAD:10001`, `HOST:6379` or `auto`: the driver runs here and connects to the
  cluster (`ray.init(address=...)`); the command blocks until the study is done.

Ray reads `RAY_AUTH_MODE` once, when `ray` is imported, so `use_token_auth` must run before that.
Nothing here imports Ray at module level for that reason.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from compsearch.search.errors import UserError

log = logging.getLogger(__name__)
JOBS_SCHEMES = ("http://", "https://")
STUDY_METADATA = "compsearch_study"
IN_JOB_ENV = "COMPSEARCH_IN_RAY_JOB"
PROJECT_DIR = Path(__file__).resolve().parents[2]  # the repository: compsearch/ and install files
# Never shipped to the cluster: environments, results, caches (Ray also honours .gitignore).
UPLOAD_EXCLUDES = [".git", ".venv*", "results", ".ci-cache", "*.egg-info", "__pycache__", "*.parquet", "*.db"]
PASS_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_VERBOSITY")
_PATH_FLAGS = ("--results-dir", "--model", "--data", "--cache-dir", "--config", "--gguf-template", "--task-path")
_ACTIVE = ("PENDING", "RUNNING")


@dataclass
class JobState:
    """The latest Ray job of a study, as the Jobs API reports it."""

    job_id: str
    status: str
    message: str | None
    start_time: float | None
    end_time: float | None


def is_jobs_address(address: str | None) -> bool:
    """True for a Ray Jobs API address (http[s]://...): the driver then runs on the cluster as a job."""
    return bool(address) and address.startswith(JOBS_SCHEMES)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a cluster address (HOST:PORT, ray://HOST:PORT) where nothing listens, at once: Ray itself
    would keep retrying for minutes. `auto` (a local cluster's own file) passes."""
    match = re.fullmatch(r"(?:[a-z]+://)?\[?([^\]/]+?)\]?:(\d+)/?", address)
    if match is None:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise UserError(f"--address {address!r}: nothing answers at {host}:{port} ({err.strerror or err}); "
                        "check the head node's address and port, or leave --address out to start Ray here") from None


def protect_token_file() -> None:
    """Ray writes its cluster token to ~/.ray/auth_token readable by every user (0644); the token lets
    anyone who has it run code on the cluster, so keep it to its owner (0600)."""
    token_file = _token_file()
    if token_file.is_file() and token_file.stat().st_uid == os.getuid() and token_file.stat().st_mode & 0o077:
        token_file.chmod(0o600)


def _token_file() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))


def use_token_auth() -> None:
    """Turn on Ray token auth for this process when a token is at hand (Ray's default for new clusters).

    The Jobs client only sends the token with `RAY_AUTH_MODE=token`; an explicit setting is kept.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or _token_file().exists():
        os.environ["RAY_AUTH_MODE"] = "token"


def jobs_client(address: str):
    """A `JobSubmissionClient` for `address`, or a UserError that says what to check."""
    if os.environ.get(IN_JOB_ENV):
        raise UserError(f"--address {address}: this driver already runs inside a Ray job; give a cluster "
                        "address (auto, ray://HEAD:10001) instead of a Jobs API address")
    use_token_auth()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise UserError(f"the Ray cluster at {address} wants a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                        "(or ~/.ray/auth_token, as on the head) before running compsearch") from None
    except Exception as err:  # requests/aiohttp raise many kinds for an address that does not answer
        raise UserError(f"no Ray Jobs API answers at {address} ({type(err).__name__}); give the head's dashboard "
                        "address (http://HEAD:8265, `ray start --head --dashboard-host=...`), or a cluster address "
                        "(auto, HOST:6379, ray://HEAD:10001) to run the driver here") from None


def job_argv(argv: list[str], cwd: Path | None = None) -> list[str]:
    """The CLI arguments for the driver inside the job: `--address auto`, local paths made absolute.

    Paths are resolved here and used as they are on the cluster: on one machine or a shared
    file system they name the same place; otherwise give paths that exist on the head.
    """
    cwd = Path(cwd or Path.cwd())
    out, tokens, seen = [], list(argv), set()
    index = 0
    while index < len(tokens):
        flag, has_value, value = tokens[index].partition("=")
        if flag == "--address" or flag in _PATH_FLAGS:
            if not has_value:
                index += 1
                value = tokens[index] if index < len(tokens) else ""
            seen.add(flag)
            if flag in _PATH_FLAGS:
                out += [flag, _absolute(value, cwd, keep_unless_exists=flag == "--model")]
        elif flag == "--storage":
            if not has_value:
                index += 1
                value = tokens[index] if index < len(tokens) else ""
            out += [flag, _absolute_storage(value, cwd)]
        else:
            out.append(tokens[index])
        index += 1
    if "--results-dir" not in seen:
        out += ["--results-dir", str((cwd / "results").resolve())]
    return out + ["--address", "auto"]


def _absolute(value: str, cwd: Path, keep_unless_exists: bool) -> str:
    """`value` as an absolute path; a model id like "org/name" stays as it is unless such a folder exists here."""
    path = cwd / Path(value).expanduser()
    return value if keep_unless_exists and not path.exists() else str(path.resolve())


def _absolute_storage(url: str, cwd: Path) -> str:
    if url.startswith("journal:"):
        return "journal:" + str((cwd / Path(url[len("journal:"):]).expanduser()).resolve())
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + str((cwd / url[len("sqlite:///"):]).resolve())
    return url


def submit_job(address: str, argv: list[str], study: str) -> str:
    """Send `compsearch <argv>` as a Ray job running the driver on the cluster; returns the job id."""
    client = jobs_client(address)
    active = [job for job in _study_jobs(client, study) if job.status in _ACTIVE]
    if active:
        raise UserError(f"study {study!r} already has Ray job {active[0].job_id} {active[0].status.lower()} at "
                        f"{address}; follow it with `ray job logs --address {address} --follow {active[0].job_id}` "
                        f"or stop it with `ray job stop --address {address} {active[0].job_id}`")
    entrypoint = shlex.join(["python", "-m", "compsearch.search.cli", *job_argv(argv)])
    env = {name: os.environ[name] for name in PASS_ENV if name in os.environ}
    runtime_env = {"working_dir": str(PROJECT_DIR), "excludes": UPLOAD_EXCLUDES, "env_vars": {**env, IN_JOB_ENV: "1"}}
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata={STUDY_METADATA: study},
                               submission_id=f"compsearch-{study}-{time.strftime('%Y%m%d-%H%M%S')}")
    log.info("submitted %s: %s", job_id, entrypoint)
    return job_id


def job_state(address: str, study: str) -> JobState | None:
    """The latest Ray job submitted for `study` at `address`, or None."""
    jobs = _study_jobs(jobs_client(address), study)
    return jobs[-1] if jobs else None


def _study_jobs(client, study: str) -> list[JobState]:
    jobs = [job for job in client.list_jobs() if (job.metadata or {}).get(STUDY_METADATA) == study]
    jobs.sort(key=lambda job: job.start_time or 0)
    return [JobState(job.submission_id, str(job.status.value if hasattr(job.status, "value") else job.status),
                     job.message, _seconds(job.start_time), _seconds(job.end_time)) for job in jobs]


def _seconds(millis: int | None) -> float | None:
    return millis / 1000 if millis else None
