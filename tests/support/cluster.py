"""A Ray cluster of several nodes on this machine, each started with ``ray start --block`` on free ports in a short
temp dir of its own, for tests that need nodes to come and go. Every process a node starts is found again by
being a descendant of its ``ray start``, so ``kill_node`` and ``close`` stop exactly this cluster's processes, by
pid, even the ones Ray put in process groups of their own. Never ``ray stop`` (it would stop
every Ray of this user)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port

BIN = Path(sys.executable).parent


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    manager_port: int
    metrics_port: int
    temp_dir: str
    log: Path


def _descendants(root: int) -> list[int]:
    """Every live process below ``root``: Ray's workers run in process groups of their own (and rename their
    command lines), but they are all children of their node's raylet."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class LocalCluster:
    env: dict[str, str]
    log_dir: Path
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start_node(self, name: str, num_cpus: int, resources: dict[str, float]) -> Node:
        head = not self.nodes
        if head:
            self.gcs_port = free_port()
        manager, metrics = free_port(), free_port()
        temp_dir = tempfile.mkdtemp(prefix=f"rc{name}-", dir="/tmp")
        cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
               "--node-manager-port", str(manager), "--object-manager-port", str(free_port()),
               "--metrics-export-port", str(metrics), "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
               "--temp-dir", temp_dir, "--object-store-memory", str(100 * 1024 * 1024)]
        if head:
            cmd += ["--head", "--port", str(self.gcs_port), "--include-dashboard", "false",
                    "--ray-client-server-port", str(free_port())]
        else:
            cmd += ["--address", self.address]
        log = self.log_dir / f"ray-{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, manager, metrics, temp_dir, log)
        self.nodes.append(node)
        deadline = time.time() + 60
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        return node

    def kill_node(self, node: Node) -> None:
        """SIGKILL every process of ``node`` at once (its raylet, agents and workers): what a machine that loses
        power looks like to the rest of the cluster."""
        for pid in [*_descendants(node.proc.pid), node.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.proc.wait(10)

    def close(self) -> None:
        for node in reversed(self.nodes):
            self.kill_node(node)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.nodes.clear()
