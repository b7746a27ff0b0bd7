"""A multi-node cluster on this one machine, for the cluster tests: real processes on 127.0.0.1.

- a Ray head (dashboard: Jobs API, Serve REST, state API) with 2 logical CPUs,
- a Ray worker node with 1 logical CPU and the custom resource ``accelerator: 1`` (standing in for a GPU),
- moto's S3 server, and an MLflow tracking server (sqlite backend, artifacts served by the server).

Logical CPUs exceed the 2 cores of the development machines on purpose: Ray counts reservations, not cores,
and an embedding actor, the scan / plan / shard tasks and a Serve replica must all find one.

Ray runs with token authentication (``RAY_AUTH_MODE=token``, the cluster's own ``RAY_AUTH_TOKEN``): clients of
the dashboard send :attr:`LocalCluster.auth`.

Every process runs in a session of its own and is stopped by :meth:`LocalCluster.down` (SIGTERM to its
process group, then SIGKILL of whatever still names the cluster's temp dir), never by ``ray stop``, which
would stop every Ray on the machine. The Ray temp dir is the cluster's own, so ``ray start``'s
``ray_current_cluster`` file lands there and a plain ``ray.init()`` elsewhere on the machine never joins it.

    python -m tests.cluster up [DIR]     # prints the addresses as JSON; DIR/cluster.json keeps them
    python -m tests.cluster down [DIR]
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .helpers import REPO, free_port

BIN = Path(sys.executable).parent  # the venv's ray, mlflow and python
ACCELERATOR = "accelerator"


@dataclass
class LocalCluster:
    root: str  # everything of the cluster lives under it: Ray's temp dir, the MLflow db, logs
    gcs_port: int = 0
    dashboard_port: int = 0
    s3_port: int = 0
    mlflow_port: int = 0
    serve_port: int = 0
    token: str = field(default_factory=lambda: secrets.token_hex(16))  # Ray's token auth, as in production
    pids: dict[str, int] = field(default_factory=dict)

    # --- addresses -------------------------------------------------------------------------
    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def storage_options(self) -> dict:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.s3_endpoint, "region_name": "us-east-1"},
        }

    @property
    def auth(self) -> dict[str, str]:
        """The header the dashboard (Jobs API, Serve REST, state API) wants."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def temp_dir(self) -> str:
        return str(Path(self.root) / "ray")

    # --- life ------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        log = open(Path(self.root) / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env or self.env(), start_new_session=True, cwd=self.root
        )
        self.pids[name] = proc.pid
        self.save()

    def env(self) -> dict:
        """The environment of the cluster's processes (and so of its jobs' drivers and workers): the venv first on
        PATH, this checkout's embray first on the import path, embray's offline settings."""
        return {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Token auth on, with this cluster's token (never ~/.ray/auth_token: a token file there would turn
            # auth on for every local ray.init() on the machine).
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }

    def up(self, timeout_s: float = 180) -> LocalCluster:
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        self.gcs_port, self.dashboard_port, self.serve_port = free_port(), free_port(), free_port()
        self._spawn_service("moto")
        self._spawn_service("mlflow")
        ray = str(BIN / "ray")
        self._spawn(
            "ray-head",
            [
                ray,
                "start",
                "--head",
                "--block",
                f"--port={self.gcs_port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=2",
                "--num-gpus=0",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
                f"--ray-client-server-port={free_port()}",
                *_agent_ports(),
            ],
        )
        self._wait_http(f"{self.dashboard_url}/api/version", timeout_s, "the Ray dashboard", name="ray-head")
        self.start_worker(timeout_s)
        self._wait_service("moto", timeout_s)
        self._wait_service("mlflow", timeout_s)
        self._wait_for_jobs(timeout_s)
        return self

    # moto and MLflow: (their port's attribute, what they are, the path that answers once they serve, its codes)
    SERVICES = {
        "moto": ("s3_port", "moto's S3 server", "/", (200, 403)),
        "mlflow": ("mlflow_port", "the MLflow server", "/health", (200,)),
    }

    def _spawn_service(self, name: str) -> None:
        """Start moto or MLflow on a free port. The port was free when asked for, but it is bound only seconds
        later (MLflow imports for ~10 s), and any process on the machine may take it meanwhile (Ray's own
        random ports, any outgoing connection's local port): :meth:`_wait_service` then starts it again."""
        port = free_port()
        setattr(self, self.SERVICES[name][0], port)
        if name == "moto":
            cmd = [str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        else:
            cmd = [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination",
                f"{self.root}/mlflow-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ]
        self._spawn(name, cmd)

    def _wait_service(self, name: str, timeout_s: float, tries: int = 3) -> None:
        """Until moto or MLflow answers; started again on another port (up to ``tries`` in all) when it could not
        bind its port or exited. (A `mlflow server` whose uvicorn cannot bind does not exit: it logs the error and
        lingers, so the log is read too.)"""
        port, what, path, ok = self.SERVICES[name]
        for attempt in range(1, tries + 1):
            try:
                url = f"http://127.0.0.1:{getattr(self, port)}{path}"
                self._wait_http(url, timeout_s, what, ok, name=name)
                return
            except _Exited:
                if attempt == tries:
                    raise
                _stop_group(self.pids.pop(name))
                log = Path(self.root) / f"{name}.log"
                log.rename(log.with_name(f"{name}-failed-{attempt}.log"))  # the next try's log starts empty
                self._spawn_service(name)

    def start_worker(self, timeout_s: float = 180) -> None:
        """Start the worker node (1 CPU and the accelerator resource) and wait until it has joined."""
        self._spawn(
            "ray-worker",
            [
                str(BIN / "ray"),
                "start",
                "--block",
                f"--address={self.ray_address}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                "--num-gpus=0",
                f"--resources={json.dumps({ACCELERATOR: 1})}",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
                *_agent_ports(),
            ],
        )
        deadline = time.monotonic() + timeout_s
        while len(self.nodes()) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker node did not join; see {self.root}/ray-worker.log")
            time.sleep(1)

    def kill_worker(self) -> None:
        """SIGKILL the worker node's processes (its raylet and agents; its Ray workers exit with the raylet),
        as a node that disappears does."""
        os.killpg(self.pids.pop("ray-worker"), signal.SIGKILL)

    def _wait_for_jobs(self, timeout_s: float) -> None:
        """Until the Jobs API runs a job: a fresh head's job agent registers a while after the dashboard answers
        (until then a submission fails with "No available agent to submit job")."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url, headers=self.auth)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                job = client.submit_job(entrypoint="python -c 'import embray'")
                break
            except RuntimeError as e:
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the first job is still {status} after {timeout_s:g}s")
            time.sleep(0.5)
        if status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"a job cannot import embray on this cluster:\n{client.get_job_logs(job)[-2000:]}")

    def nodes(self) -> list[dict]:
        """Alive nodes, from the dashboard's state API: [{node_id, is_head_node, resources_total, ...}]."""
        import requests

        r = requests.get(
            f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100, "detail": 1}, headers=self.auth, timeout=10
        )
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def node_ids(self) -> tuple[str, str]:
        """(head node id, worker node id)."""
        nodes = self.nodes()
        head = next(n["node_id"] for n in nodes if n["is_head_node"])
        worker = next(n["node_id"] for n in nodes if ACCELERATOR in n["resources_total"])
        return head, worker

    def down(self) -> None:
        """Stop every process of this cluster, and only those."""
        for pid in self.pids.values():
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in self.pids.values()):
            time.sleep(0.5)
        for pid in self.pids.values():
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _kill_naming(self.temp_dir)  # Ray workers started by the raylets live in sessions of their own

    # --- helpers ---------------------------------------------------------------------------
    def save(self) -> None:
        (Path(self.root) / "cluster.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, root: str) -> LocalCluster:
        return cls(**json.loads((Path(root) / "cluster.json").read_text()))

    def _wait_http(
        self, url: str, timeout_s: float, what: str, ok: tuple[int, ...] = (200,), name: str | None = None
    ) -> None:
        """Until ``url`` answers with one of ``ok``. With ``name`` (the process that should answer), fail at once,
        with its log's tail, when that process has exited or logged that its address is in use."""
        import requests

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(url, headers=self.auth, timeout=5).status_code in ok:
                    return
            except requests.RequestException:
                pass
            if name is not None:
                tail = self.log_tail(name)
                if not _alive(self.pids[name]) or (name in self.SERVICES and "address already in use" in tail):
                    raise _Exited(f"{what} ({name}) could not serve {url}; the end of its log:\n{tail}")
            if time.monotonic() > deadline:
                log = f"; the end of its log:\n{self.log_tail(name)}" if name else ""
                raise TimeoutError(f"{what} did not answer at {url} within {timeout_s:g}s; logs in {self.root}{log}")
            time.sleep(0.5)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        """The last characters of a process's log (what a failed start printed)."""
        try:
            return (Path(self.root) / f"{name}.log").read_bytes()[-chars:].decode("utf-8", "replace")
        except OSError:
            return ""


class _Exited(RuntimeError):
    """A cluster process exited, or cannot serve (its port was taken), while it was awaited."""


def _stop_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(1)


def _agent_ports() -> list[str]:
    """Free ports for a node's agents. Ray's defaults (52365 for the dashboard agent, ...) are taken by any other
    Ray on the machine (the test session's own local Ray runs one): the head's job agent would never come up,
    and every submission would fail with "No available agent to submit job"."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _kill_naming(text: str) -> None:
    """SIGKILL every process whose command line mentions ``text`` (Linux: /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if text in (proc / "cmdline").read_bytes().decode("utf-8", "replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def new_root() -> str:
    """A short directory for a cluster (Ray's socket paths must stay under ~100 characters)."""
    return tempfile.mkdtemp(prefix="embray-cl-", dir="/tmp")


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    root = sys.argv[2] if len(sys.argv) > 2 else str(REPO / ".cluster")
    if what == "up":
        Path(root).mkdir(parents=True, exist_ok=True)
        c = LocalCluster(root=str(Path(root).resolve())).up()
        print(
            json.dumps(
                {
                    **asdict(c),
                    "ray_address": c.ray_address,
                    "dashboard": c.dashboard_url,
                    "s3": c.s3_endpoint,
                    "mlflow": c.tracking_uri,
                },
                indent=2,
            )
        )
    elif what == "down":
        LocalCluster.load(root).down()
    else:
        sys.exit("usage: python -m tests.cluster up|down [DIR]")


if __name__ == "__main__":
    main()
