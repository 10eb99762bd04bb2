"""A multi-node Ray cluster on this machine for tests/test_multinode.py: a head and two worker
nodes (``ray.cluster_utils.Cluster``: each node its own raylet, object store and workers), with
the dashboard so that ``serve deploy`` can reach it.

Run as a process of its own, started the way cluster/README.md starts a Ray node: from a shell
that sourced the Secret-like env file, so every node (and every replica on it) inherits those
``HARK_*`` variables while the test process that deploys and calls the app has none. (A process
holds one Ray connection; the test process may also hold the session's single-node app.)

Protocol, one JSON line each way: it prints ``{"gcs", "dashboard", "nodes": {name: node_id}}``
once the cluster is up, then answers each command read from stdin:

- ``status``: Serve's own view (``serve.status()``) of the app's deployments, and where each live
  replica runs (``{"deployment", "node"}``, node by name);
- ``remove NAME``: kills that node's raylet and every process on it, its workers too, at once
  (SIGKILL, no graceful shutdown), as a lost VM or pod; it answers once none of them is left.

End of stdin shuts the cluster down (only the processes it started).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

import psutil
import ray
import ray._private.ray_constants as ray_constants
import ray._private.services as services
from ray import serve
from ray.cluster_utils import Cluster

# Per worker node: one ASR replica and one Jobs replica fit (the config asks for one slot each).
WORKER_RESOURCES = {"asr_slot": 1, "jobs_slot": 1}
NODE_START_WAIT_S = 180.0


def _patient_get_node(get_node):
    """Ray waits a fixed 30 s for a new raylet to register with the GCS, which a 2-core machine
    under other load can miss (the raylet was merely slow). Each lookup here retries for longer;
    the behaviour of a registered node is unchanged."""

    def wrapped(*args, **kwargs):
        deadline = time.monotonic() + NODE_START_WAIT_S
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    return wrapped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lose_node(cluster: Cluster, node) -> None:
    """The node's raylet and everything under it killed at once, as when its VM is lost.
    ``Cluster.remove_node`` kills the processes the node started (the raylet, its object store)
    but not the raylet's workers: they notice the dead raylet later (a periodic check), and meanwhile
    a replica on the "lost" node went on working (a job runner claimed a job after the node was
    gone). Answers once none of them is left."""
    [raylet] = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    root = psutil.Process(raylet.process.pid)
    workers = root.children(recursive=True)
    for process in [root, *workers]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    cluster.remove_node(node, allow_graceful=False)

    def alive(process: psutil.Process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 30
    while any(alive(p) for p in workers):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of the lost node still alive: {[p.pid for p in workers if alive(p)]}")
        time.sleep(0.05)


def _name(value) -> str:
    return str(getattr(value, "value", value))  # Serve's enums, or their values


def _status(names: dict[str, str]) -> dict:
    from ray.util.state import list_actors

    app = serve.status().applications.get("hark")
    deployments = {}
    if app is not None:
        for name, overview in app.deployments.items():
            deployments[name] = {
                "status": _name(overview.status),
                "trigger": _name(overview.status_trigger),
                "replicas": {_name(state): count for state, count in overview.replica_states.items()},
            }
    replicas = [
        {"deployment": actor.class_name.rsplit(":", 1)[-1], "node": names.get(actor.node_id, actor.node_id),
         "name": actor.name}
        for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
        if actor.class_name.startswith("ServeReplica:hark:")
    ]
    return {"app": _name(app.status) if app else None, "message": app.message if app else "",
            "deployments": deployments, "replicas": replicas}


def main(dashboard_port: int, object_store_mb: int) -> None:
    # Answers go out on the original stdout; whatever Ray prints (a killed raylet's last log
    # lines, say) goes to stderr instead of between them.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    services.get_node = _patient_get_node(services.get_node)
    started = time.monotonic()
    node_args = {"num_cpus": 1, "object_store_memory": object_store_mb * 1024**2}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node_args, "resources": {"head": 1},
            "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
            # Ray's fixed default (52365) may be taken by another Ray on this machine.
            "dashboard_agent_listen_port": _free_port(),
        },
    )
    try:
        nodes = {"head": cluster.head_node}
        for name in ("a", "b"):
            nodes[name] = cluster.add_node(**node_args, resources=WORKER_RESOURCES)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        names = {node.node_id: name for name, node in nodes.items()}
        print(json.dumps({"gcs": cluster.address, "dashboard": f"http://127.0.0.1:{dashboard_port}",
                          "nodes": {name: node.node_id for name, node in nodes.items()},
                          "started_s": round(time.monotonic() - started, 1)}), file=answers)
        for line in sys.stdin:
            command, *rest = line.split()
            try:
                if command == "status":
                    answer = _status(names)
                elif command == "remove":
                    lose_node(cluster, nodes.pop(rest[0]))
                    answer = {"removed": rest[0]}
                else:
                    answer = {"error": f"unknown command {command!r}"}
            except Exception as exc:  # noqa: BLE001 - the test shows it
                answer = {"error": repr(exc)}
            print(json.dumps(answer), file=answers)
    finally:
        ray.shutdown()
        for node in [*cluster.worker_nodes, cluster.head_node]:  # at once: nothing here needs a graceful end
            cluster.remove_node(node, allow_graceful=False)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
