"""A real Flower deployment on 127.0.0.1 for tests: one SuperLink, SuperNodes, ``flwr run``.

Every process is started here with ``subprocess.Popen`` and stopped here by its own process id;
the helpers they spawn (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``) are found through
``/proc`` as descendants of those ids (recorded before the parent is stopped, since an orphan
loses its parent link) and stopped by id too. Insecure transport, loopback only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children_of() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = children_of(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Loopback:
    """SuperLink + SuperNodes + ``flwr run`` under ``root`` (logs in ``root/logs``)."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "flwr_home"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.helpers: set[int] = set()  # descendants seen so far, stopped by id at the end
        self.env = {
            **os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(args, cwd=self.root, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        self._start("superlink", [
            str(VENV_BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
            "--port", str(self.port), "--disable-runtime-dependency-installation",
        ])
        self.wait_for(lambda: _port_open(self.port), 60, "the SuperLink to listen")

    def start_node(self, name: str, node_config: str) -> None:
        self._start(name, [
            str(VENV_BIN / "flower-supernode"), "--insecure",
            "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
            "--node-config", node_config,
        ])

    def flwr_run(self, app: Path, run_config: str) -> subprocess.Popen:
        return self._start("flwr_run", [
            str(VENV_BIN / "flwr"), "run", str(app), "loopback", "--stream",
            "--run-config", run_config,
        ])

    def clientapps(self, name: str) -> set[int]:
        """Pids of the ClientApp processes the node ``name`` is running right now."""
        pids = descendants(self.procs[name].pid)
        self.helpers.update(pids)
        return {p for p in pids if "flwr-clientapp" in command_line(p) and alive(p)}

    def kill_machine(self, name: str) -> None:
        """The site's machine goes down: SIGTERM to the SuperNode and every process under it
        (its SuperExec and running ClientApp), all at once."""
        tree = descendants(self.procs[name].pid)
        self.helpers.update(tree)
        for pid in [self.procs[name].pid, *tree]:
            if _ours(pid):
                os.kill(pid, signal.SIGTERM)
        self._reap([name], wait=20)

    def close(self) -> list[int]:
        """Stops everything this object started (SuperNodes first, then the SuperLink); returns
        the Flower pids still alive afterwards."""
        nodes = [n for n in self.procs if n != "superlink"]
        for group in (nodes, ["superlink"]):
            for name in group:
                self.helpers.update(descendants(self.procs[name].pid))
                if self.procs[name].poll() is None:
                    self.procs[name].send_signal(signal.SIGTERM)
            self._reap(group, wait=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_ours(p) for p in self.helpers):
            time.sleep(0.2)
        for pid in self.helpers:
            if _ours(pid):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        return [p for p in [*self.helpers, *(p.pid for p in self.procs.values())] if _ours(p)]

    def _reap(self, names: list[str], wait: float) -> None:
        deadline = time.monotonic() + wait
        for name in names:
            proc = self.procs[name]
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for proc in self.procs.values():
                self.helpers.update(descendants(proc.pid))
            superlink = self.procs.get("superlink")
            if superlink is not None and superlink.poll() is not None:
                raise RuntimeError(f"the SuperLink exited ({superlink.returncode}) while "
                                   f"waiting for {what}:\n{self.tail('superlink')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                   + "\n".join(self.tail(n) for n in self.procs))
            time.sleep(0.25)

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return f"--- {name} ---\n" + "\n".join(text[-lines:])


def _ours(pid: int) -> bool:
    """Alive and still a Flower process (a recorded pid may since belong to someone else)."""
    line = command_line(pid)
    return alive(pid) and ("flwr" in line or "flower" in line)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
