#!/usr/bin/env python3
"""A real two-node SLURM cluster on this machine (Debian's slurm-wlm: one slurmctld, two slurmd), for trying
the project's sbatch scripts before a real cluster, and for the tests that run them.

    sudo python3 slurm/local/cluster.py start --dir /tmp/mme5-slurm     # prints the SLURM_CONF to export
    export SLURM_CONF=/tmp/mme5-slurm/slurm.conf
    mkdir -p logs && sbatch --nodes 2 --ntasks-per-node 1 --gpus-per-node 1 --cpus-per-task 1 ...
    sudo python3 slurm/local/cluster.py stop --dir /tmp/mme5-slurm

Needs root (the daemons run as root, `/etc/hosts` gets "n1 n2"); installs slurm-wlm with apt when missing.
Nodes n1 and n2 have 2 CPUs, 16 GiB and two placeholder GPUs each (gres files, no device behind them), so
scripts that ask for `--gpus-per-node` are scheduled; CUDA_VISIBLE_DEVICES stays unset. Everything lives
in the folder given (config, state, logs, pid files); `stop` ends the daemons and any job process left
(found by this cluster's SLURM_CONF in its environment) by PID, and restores `/etc/hosts`. The settings and
why each is needed are in shared/reference/slurm.md; the short timers make a requeue run again in seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NODES = ("n1", "n2")
HOSTS = Path("/etc/hosts")
HOSTS_LINE = "127.0.0.1 " + " ".join(NODES) + "  # mme5 local SLURM cluster\n"
PACKAGES = ("slurm-wlm",)
DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


class ClusterError(RuntimeError):
    """The cluster could not start (the message says why)."""


def free_ports(count: int) -> list[int]:
    """`count` consecutive free TCP ports (slurm.conf takes a node port range)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return list(range(first, first + count))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise ClusterError("no run of free ports found")


def config(folder: Path, ports: list[int]) -> str:
    controller, first, last = ports[0], ports[1], ports[-1]
    return f"""ClusterName=mme5local
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={controller}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
StateSaveLocation={folder}/state
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmdSpoolDir={folder}/spool/%n
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
EnforcePartLimits=ALL
MailProg=/bin/true
KillWait=2
ReturnToService=2
SchedulerParameters=sched_interval=1
JobCompType=jobcomp/none
NodeName=n[1-2] NodeAddr=127.0.0.1 Port=[{first}-{last}] CPUs=2 RealMemory=16384 Gres=gpu:2 State=UNKNOWN
PartitionName=local Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


def install() -> None:
    """slurm-wlm from apt, when its daemons are missing."""
    if all(shutil.which(tool) for tool in DAEMONS):
        return
    if os.geteuid() != 0:
        raise ClusterError("slurm-wlm is not installed and installing it needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    for command in (["apt-get", "update", "-qq"], install_command):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0 and command[1] == "install":
            raise ClusterError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")


def add_hosts() -> None:
    """Map the node names to 127.0.0.1 (Lightning's MASTER_ADDR is the first node's name)."""
    text = HOSTS.read_text()
    if HOSTS_LINE not in text:
        HOSTS.write_text(text + ("" if text.endswith("\n") or not text else "\n") + HOSTS_LINE)


def remove_hosts() -> None:
    if HOSTS.exists() and HOSTS_LINE in HOSTS.read_text():
        HOSTS.write_text(HOSTS.read_text().replace(HOSTS_LINE, ""))


def start(folder: str | Path, timeout: float = 30.0) -> Path:
    """Start the cluster in `folder`; returns the config file (export it as SLURM_CONF)."""
    if os.geteuid() != 0:
        raise ClusterError("the local cluster runs its daemons as root: run as root")
    install()
    folder = Path(folder).resolve()
    stop(folder)  # a previous cluster in the same folder
    for sub in ("state", "spool", "gpus"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(2):
        (folder / "gpus" / f"gpu{i}").touch()
    conf = folder / "slurm.conf"
    conf.write_text(config(folder, free_ports(1 + len(NODES))))
    (folder / "gres.conf").write_text(f"NodeName=n[1-2] Name=gpu File={folder}/gpus/gpu[0-1]\n")
    add_hosts()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        _run(["slurmctld", "-f", str(conf)], env)
        for node in NODES:
            _run(["slurmd", "-f", str(conf), "-N", node], env)
        _wait_idle(env, folder, timeout)
    except BaseException:
        stop(folder)
        raise
    return conf


def _run(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()[-500:]}")


def _wait_idle(env: dict[str, str], folder: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True)
        states = result.stdout.strip()
        lines = states.splitlines()
        if len(lines) == len(NODES) and all(line.split()[1] == "idle" for line in lines):
            return
        time.sleep(0.3)
    logs = "\n".join(p.read_text()[-400:] for p in sorted(folder.glob("*.log")))
    raise ClusterError(f"nodes not idle after {timeout:.0f} s ({states or 'no answer'}); logs:\n{logs}")


def stop(folder: str | Path) -> None:
    """End the daemons (by pid file) and every process of this cluster's jobs; restore /etc/hosts."""
    folder = Path(folder).resolve()
    pids = [int(p.read_text().split()[0]) for p in folder.glob("*.pid") if p.read_text().strip()]
    pids += job_processes(folder / "slurm.conf")
    _end(pids)
    for pid_file in folder.glob("*.pid"):
        pid_file.unlink()
    remove_hosts()


def job_processes(conf: Path) -> list[int]:
    """Processes whose environment names this cluster's config (job steps, slurmstepd, leftovers)."""
    marker = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _end(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace` seconds."""
    alive = []
    for pid in set(pids):
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _exists(pid)]
        time.sleep(0.1)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", required=True, type=Path,
                        help="folder for the config, state, logs and pid files")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            print(f"export SLURM_CONF={start(args.dir)}")
        else:
            stop(args.dir)
    except ClusterError as error:
        sys.exit(f"local SLURM cluster: {error}")


if __name__ == "__main__":
    main()
