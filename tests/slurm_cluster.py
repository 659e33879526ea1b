"""A real single-node Slurm cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) that lives in one directory.

It runs Debian's own Slurm packages as root, without systemd and without touching /etc: every config, state,
log, pid, socket and database file is under ROOT, the daemons listen on free ports, and clients find the
cluster through ``SLURM_CONF``.  The node poses as an 8-CPU, 16 GB, 8-GPU machine on any box, so a workflow's
CPU/GPU partitioning, ``--gpus=h200:N`` requests and ``sacct`` accounting can be tested on a laptop or CI VM.

    with SlurmCluster(tmp_path / "slurm") as cluster:
        subprocess.run(["sbatch", "--wait", "--wrap", "true"], env={**os.environ, **cluster.env}, check=True)
        print(cluster.sacct("-X", "-o", "JobID,State", "-P", "-n"))

By hand: ``python tests/slurm_cluster.py up /tmp/slurm`` (prints the exports a shell needs), then
``python tests/slurm_cluster.py down /tmp/slurm``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

CLUSTER_NAME = "deepcast-test"
ACCOUNT = "test"
# Set in every daemon's environment, so teardown can tell this cluster's processes (and the slurmstepd that
# slurmd forks, which inherit it) from anyone else's before it signals them.
MARKER = "DEEPCAST_SLURM_ROOT"
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# Commands a cluster needs; a tuple lists alternatives.  The values are the Debian packages that ship them.
REQUIRED_COMMANDS: dict[str | tuple[str, ...], str] = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "slurmdbd": "slurmdbd",
    "sbatch": "slurm-client",
    "srun": "slurm-client",
    "sacct": "slurm-client",
    "sacctmgr": "slurm-client",
    "scontrol": "slurm-client",
    "sinfo": "slurm-client",
    "munged": "munge",
    ("mariadbd", "mysqld"): "mariadb-server",
    ("mariadb-install-db", "mysql_install_db"): "mariadb-server",
}
# Client commands that get a wrapper in ROOT/bin (see SlurmCluster._write_wrappers).
CLIENT_COMMANDS = (
    "sacct",
    "sacctmgr",
    "salloc",
    "sattach",
    "sbatch",
    "sbcast",
    "scancel",
    "scontrol",
    "sdiag",
    "sinfo",
    "sprio",
    "squeue",
    "sreport",
    "srun",
    "sshare",
    "sstat",
    "strigger",
)
# sacct states after which a job no longer changes.
FINAL_STATES = frozenset(
    ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT")
)
# Stop order: compute node first, then the controller (it flushes job records to slurmdbd), then the rest.
DAEMONS = ("slurmd", "slurmctld", "slurmdbd", "mariadb", "munged")
# Unix socket paths longer than this do not fit in sockaddr_un.sun_path.
MAX_SOCKET_PATH = 107
# The paths under ROOT that this module owns and wipes on `up`; anything else in ROOT is left alone.
MANAGED = (
    "slurm.conf",
    "gres.conf",
    "cgroup.conf",
    "slurmdbd.conf",
    "mysql-init.sql",
    "bin",
    "dev",
    "log",
    "munge",
    "mysql",
    "run",
    "spool",
    "state",
)


def which(name: str) -> str | None:
    """`name` on PATH or in the sbin directories, which a non-login root shell may lack on PATH."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def _names(command: str | tuple[str, ...]) -> tuple[str, ...]:
    return (command,) if isinstance(command, str) else command


def missing_packages() -> list[str]:
    """The required commands that are not installed ("mariadbd/mysqld" for alternatives); empty when all are."""
    return ["/".join(_names(cmd)) for cmd in REQUIRED_COMMANDS if not any(which(n) for n in _names(cmd))]


def install_hint(missing: Sequence[str]) -> str:
    """The apt-get line that installs the Debian packages providing the `missing` commands."""
    by_name = {"/".join(_names(cmd)): pkg for cmd, pkg in REQUIRED_COMMANDS.items()}
    packages = sorted({by_name.get(name, name) for name in missing})
    return "apt-get install -y --no-install-recommends " + " ".join(packages)


def _find(*names: str) -> str:
    for name in names:
        if path := which(name):
            return path
    raise RuntimeError(f"{'/'.join(names)} is not installed; {install_hint(['/'.join(names)])}")


def slurm_version() -> str:
    """The installed Slurm version, e.g. "22.05.8".

    Read from ``slurmd -V``: unlike ``sinfo --version``, it works without any slurm.conf (the client commands
    die with "Could not establish a configuration source" before printing their version).
    """
    out = subprocess.run([_find("slurmd"), "-V"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"\b(\d+)\.(\d+)\.(\d+)\b", out)
    if not match:
        raise RuntimeError(f"cannot parse the Slurm version from `slurmd -V`: {out!r}")
    return match.group(0)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free right now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _proc_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie counts as dead (PID 1 of this VM may never reap orphaned daemons)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return fields.rsplit(")", 1)[-1].split()[0] != "Z"


def _proc_environ(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _scrubbed_environ() -> dict[str, str]:
    """os.environ without Slurm variables, so an outer allocation (tests run inside a real job) cannot leak in."""
    prefixes = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SACCT_", "SINFO_", MARKER)
    return {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}


class SlurmCluster:
    """One cluster under `root`; `start()`/`stop()` or use it as a context manager.

    `stop()` works from a fresh process too (it needs only `root`), which is what ``down ROOT`` does.
    """

    def __init__(
        self,
        root: Path,
        gpus: int = 8,
        gpu_type: str = "h200",
        *,
        cpus: int = 8,
        real_memory_mb: int = 16000,
        name: str = CLUSTER_NAME,
        self_check: bool = True,
        timeout: float = 60.0,
    ) -> None:
        self.root = Path(root).absolute()
        if not re.fullmatch(r"[A-Za-z0-9_./+-]+", str(self.root)):
            # slurm.conf has no quoting: a space, '#' or '=' in a path would be misparsed.
            raise ValueError(f"Slurm config paths must be plain: {self.root}")
        if not re.fullmatch(r"[A-Za-z0-9_.]+", gpu_type):
            raise ValueError(f"bad GPU type {gpu_type!r}")
        self.gpus = gpus
        self.gpu_type = gpu_type
        self.cpus = cpus
        self.real_memory_mb = real_memory_mb
        self.name = name
        self.do_self_check = self_check
        self.timeout = timeout
        # The node must be named after this host: slurmd finds its NodeName by gethostname(), and slurmctld
        # refuses to run unless SlurmctldHost is this host's short or long name ("localhost" fails on `vm`).
        self.hostname = socket.gethostname().split(".")[0]
        self.up_seconds: float | None = None
        self.timings: dict[str, float] = {}  # seconds per start step, for finding what makes `up` slow
        self.self_check_output = ""
        self.ports: dict[str, int] = {}
        self.db_password = ""
        self._version: str | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- paths ----------------------------------------------------------------------------------------------

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def munge_socket(self) -> Path:
        return self.run_dir / "munge.socket"

    @property
    def mysql_socket(self) -> Path:
        return self.run_dir / "mysql.sock"

    def _pid_file(self, daemon: str) -> Path:
        """Our own record of a daemon's pid (the daemons' own pid files are in run/ too, named after them)."""
        return self.run_dir / "pids" / f"{daemon}.pid"

    # -- public API -----------------------------------------------------------------------------------------

    @property
    def version(self) -> str:
        if self._version is None:
            self._version = slurm_version()
        return self._version

    @property
    def env(self) -> dict[str, str]:
        """What a client needs on top of os.environ: ``{**os.environ, **cluster.env}``.

        PATH starts with ROOT/bin, whose wrappers pin SLURM_CONF: snakemake-executor-plugin-slurm-jobstep
        deletes every SLURM_* variable (SLURM_CONF included) before its inner ``srun``, which would otherwise
        look for /etc/slurm/slurm.conf and fail.
        """
        path = os.environ.get("PATH", os.defpath)
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.bin_dir}{os.pathsep}{path}"}

    def run(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        cmd = [_find(args[0]), *args[1:]]
        env = {**_scrubbed_environ(), **self.env}
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=self.root)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"`{shlex.join(args)}` timed out after {timeout} s\n{self.logs()}") from exc
        if check and result.returncode != 0:
            raise RuntimeError(
                f"`{shlex.join(args)}` exited {result.returncode}:\n{result.stdout}{result.stderr}\n{self.logs()}"
            )
        return result

    def sacct(self, *args: str) -> str:
        """The stdout of ``sacct ARGS`` against this cluster (raises RuntimeError if sacct fails)."""
        return self.run("sacct", *args).stdout

    def logs(self, lines: int = 30) -> str:
        """The last `lines` lines of each daemon log, for assertion messages."""
        parts = []
        for log in ("munged.log", "mariadb.err", "slurmdbd.log", "slurmctld.log", "slurmd.log"):
            path = self.log_dir / log
            text = _tail(path, lines)
            if not text:
                # No log file: munged in the foreground logs to stderr, and a Slurm daemon that dies before
                # opening its log says why on stderr.
                path = path.with_suffix(".out")
                text = _tail(path, lines)
            if text:
                parts.append(f"==> {path} <==\n{text}")
        return "\n".join(parts) or f"(no daemon logs under {self.log_dir})"

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- start ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Write the configs and start all daemons; on any failure stop what started and raise RuntimeError."""
        missing = missing_packages()
        if missing:
            raise RuntimeError(f"Slurm test cluster needs {', '.join(missing)}: {install_hint(missing)}")
        if os.geteuid() != 0:
            raise RuntimeError("the Slurm test cluster runs its daemons as root (SlurmUser=root)")
        if running := self._running_daemons():
            raise RuntimeError(f"a cluster is already running under {self.root} ({', '.join(running)}); stop it")
        began = time.monotonic()
        steps: list[tuple[str, Callable[[], object]]] = [
            ("prepare", self._prepare),
            ("munged", self._start_munge),
            ("mariadb", self._start_mariadb),
            ("slurmdbd", self._start_slurmdbd),
            ("sacctmgr", self._register_cluster),
            ("slurmctld", self._start_slurmctld),
            ("slurmd", self._start_slurmd),
            ("idle", self._wait_idle),
        ]
        if self.do_self_check:
            steps.append(("self-check", self._run_self_check))
        self.timings = {}
        try:
            for step, action in steps:
                step_began = time.monotonic()
                action()
                self.timings[step] = time.monotonic() - step_began
        except BaseException:
            self.stop()
            raise
        self.up_seconds = time.monotonic() - began

    def _prepare(self) -> None:
        for name in MANAGED:
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        for sub in ("bin", "dev", "log", "run", "run/pids", "spool", "state"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for sock in (self.munge_socket, self.mysql_socket):
            if len(str(sock)) > MAX_SOCKET_PATH:
                raise RuntimeError(f"socket path too long for a unix socket ({len(str(sock))} chars): {sock}")
        self.ports = dict(zip(("slurmctld", "slurmd", "slurmdbd", "mysql"), _free_ports(4), strict=True))
        self.db_password = secrets.token_hex(16)
        self._write_fake_gpus()
        self._write_configs()
        self._write_wrappers()

    def _write_fake_gpus(self) -> None:
        """Character devices standing in for /dev/nvidiaN: clones of /dev/null (same major:minor).

        Without a gres.conf ``File=`` Slurm has no device indices and never sets CUDA_VISIBLE_DEVICES.  slurmd
        only stat()s the files, but it drops any that is not a character or block device ("is not a valid
        character or block device", 22.05 and 24.11 alike), so empty regular files do not work, whatever
        Slurm's own testsuite (test39.18) says.  With task/none no device cgroup uses the numbers.
        """
        null = os.stat("/dev/null").st_rdev
        for index in range(self.gpus):
            os.mknod(self.root / "dev" / f"nvidia{index}", 0o600 | stat.S_IFCHR, null)

    def _write_configs(self) -> None:
        root, host, ports = self.root, self.hostname, self.ports
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}"
        gres = f" Gres=gpu:{self.gpu_type}:{self.gpus}" if self.gpus else ""
        # SlurmdParameters=config_overrides: schedule with the CPUs/memory/GPUs declared here, not what the VM
        # has; without it a node that declares more than it has is drained as INVAL.
        # AccountingStoragePass: despite its name, Slurm's RPCs between its own daemons and clients take the
        # munge socket from it (`_global_auth_key` in slurm_protocol_api.c); AuthInfo alone only reaches
        # cred/munge and slurmdbd, and everything else would ask the system's /run/munge socket.
        # batch_sched_delay=0: start a batch job within the 1 s background cycle, not up to 3 s after sbatch.
        # DefMemPerCPU: with CR_Core_Memory a job without --mem would otherwise take the node's whole memory,
        # and jobs would run one at a time.
        self.conf.write_text(
            f"""\
ClusterName={self.name}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
{auth}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={max(self.real_memory_mb // self.cpus, 1)}
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
SchedulerParameters=batch_sched_delay=0
KillWait=5
InactiveLimit=0
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports["slurmdbd"]}
AccountingStoragePass={self.munge_socket}
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={self.cpus} RealMemory={self.real_memory_mb}{gres} \
State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={host} Default=NO MaxTime=INFINITE State=UP
"""
        )
        files = f"nvidia[0-{self.gpus - 1}]" if self.gpus > 1 else "nvidia0"
        # Flags=nvidia_gpu_env: set CUDA_VISIBLE_DEVICES only (the default also sets ROCR/ZE/GPU_DEVICE_ORDINAL).
        gres_conf = f"Name=gpu Type={self.gpu_type} File={root}/dev/{files} Flags=nvidia_gpu_env\n" if self.gpus else ""
        (root / "gres.conf").write_text(gres_conf)
        # slurmd always loads a cgroup plugin.  24.05+ can switch it off.  Older versions autodetect, and on a
        # pure cgroup2 host pick cgroup/v2, which needs a systemd-delegated cgroup (absent without systemd) and
        # makes slurmd exit; cgroup/v1's init() only allocates lists, so it is safe anywhere as long as no
        # cgroup proctrack/task/jobacct plugin is used (none is).
        plugin = "disabled" if _version_tuple(self.version) >= (24, 5) else "cgroup/v1"
        (root / "cgroup.conf").write_text(f"CgroupPlugin={plugin}\n")
        dbd_conf = root / "slurmdbd.conf"
        dbd_conf.touch(mode=0o600)  # slurmdbd exits unless its conf is exactly 0600 (it holds StoragePass)
        dbd_conf.write_text(
            f"""\
{auth}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports["slurmdbd"]}
SlurmUser=root
DebugLevel=info
LogFile={root}/log/slurmdbd.log
PidFile={root}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["mysql"]}
StorageUser=slurm
StoragePass={self.db_password}
StorageLoc=slurm_acct_db
"""
        )
        init_sql = root / "mysql-init.sql"
        init_sql.touch(mode=0o600)
        init_sql.write_text(
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.db_password}';\n"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';\n"
        )

    def _write_wrappers(self) -> None:
        """ROOT/bin/<client>: exec the real client with SLURM_CONF pinned to this cluster (see `env`)."""
        for name in CLIENT_COMMANDS:
            if real := which(name):
                wrapper = self.bin_dir / name
                wrapper.write_text(
                    f"#!/bin/sh\nSLURM_CONF={shlex.quote(str(self.conf))}\nexport SLURM_CONF\n"
                    f'exec {shlex.quote(real)} "$@"\n'
                )
                wrapper.chmod(0o755)

    def _spawn(self, daemon: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        """Start `daemon` in the foreground of its own session, stdout/stderr to log/<daemon>.out."""
        env = {**_scrubbed_environ(), "SLURM_CONF": str(self.conf), MARKER: str(self.root)}
        with (self.log_dir / f"{daemon}.out").open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
                start_new_session=True,  # a Ctrl-C in the test run must not kill daemons before teardown
            )
        self._procs[daemon] = proc
        self._pid_file(daemon).write_text(f"{proc.pid}\n")
        return proc

    def _wait(self, what: str, ready: Callable[[], bool], daemon: str | None = None) -> None:
        """Poll `ready` until it holds; fail early if `daemon` exits, or after the timeout."""
        deadline = time.monotonic() + self.timeout
        while not ready():
            proc = self._procs.get(daemon) if daemon else None
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{daemon} exited with {proc.returncode} while waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {self.timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(0.2)

    def _start_munge(self) -> None:
        """munged with its own key and socket, so the system's /run/munge (and a running munged) stay untouched.

        --force: otherwise munged exits on any group- or world-writable directory (without the sticky bit) on
        the way to its socket, seed or key ("PRNG seed dir is insecure"), which a caller's ROOT may well have.
        """
        key = self.root / "munge" / "munge.key"
        key.parent.mkdir(mode=0o700)
        key.touch(mode=0o400)
        key.write_bytes(secrets.token_bytes(1024))
        cmd = [
            _find("munged"),
            "--foreground",
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={self.run_dir / 'munged.pid'}",
            f"--log-file={self.log_dir / 'munged.log'}",
            f"--seed-file={self.run_dir / 'munged.seed'}",
            "--num-threads=2",
        ]
        self._spawn("munged", cmd)
        self._wait("the munge socket", self.munge_socket.exists, "munged")

    def _start_mariadb(self) -> None:
        """A private MariaDB on 127.0.0.1:<free port>; --no-defaults keeps /etc/mysql (and its socket) out.

        The init file creates the slurmdbd user at every start, so it works whatever the root auth method.
        The innodb settings are the least that slurmdbd accepts without logging "not recommended values".
        """
        datadir = self.root / "mysql"
        install = [
            _find("mariadb-install-db", "mysql_install_db"),
            "--no-defaults",
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--user=root",
        ]
        result = subprocess.run(install, capture_output=True, text=True, cwd=self.root, timeout=self.timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(install)} failed:\n{result.stdout}{result.stderr}")
        cmd = [
            _find("mariadbd", "mysqld"),
            "--no-defaults",
            f"--datadir={datadir}",
            f"--socket={self.mysql_socket}",
            f"--port={self.ports['mysql']}",
            "--bind-address=127.0.0.1",
            "--skip-networking=0",
            "--skip-name-resolve",
            "--user=root",
            f"--pid-file={self.run_dir / 'mariadb.pid'}",
            f"--log-error={self.log_dir / 'mariadb.err'}",
            f"--init-file={self.root / 'mysql-init.sql'}",
            "--innodb-buffer-pool-size=512M",
            "--innodb-lock-wait-timeout=900",
        ]
        self._spawn("mariadb", cmd)
        # Not a TCP probe: MariaDB logs every connection that closes without logging in as a warning.
        err_log = self.log_dir / "mariadb.err"
        self._wait("MariaDB", lambda: "ready for connections" in _tail(err_log, 5), "mariadb")

    def _start_slurmdbd(self) -> None:
        # slurmdbd has no -f: it reads slurmdbd.conf from the directory of $SLURM_CONF.
        self._spawn("slurmdbd", [_find("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: _port_open(self.ports["slurmdbd"]), "slurmdbd")

    def _register_cluster(self) -> None:
        """Create the cluster, and an account for root, in the accounting DB before slurmctld first starts.

        slurmdbd may accept connections before it has created its tables, so the first ``add cluster`` is
        retried (as koesterlab/setup-slurm-action does).  Adding a cluster also creates the "root" account
        and root's association; the "test" account becomes root's default so jobs show a real Account.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            result = self.run("sacctmgr", "-i", "add", "cluster", self.name, check=False)
            if result.returncode == 0:
                break
            if self._procs["slurmdbd"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sacctmgr add cluster {self.name} failed:\n{result.stderr}\n{self.logs()}")
            time.sleep(0.5)
        self.run("sacctmgr", "-i", "add", "account", ACCOUNT, "Description=test", "Organization=test")
        self.run("sacctmgr", "-i", "add", "user", "root", f"Account={ACCOUNT}")
        self.run("sacctmgr", "-i", "modify", "user", "root", "set", f"DefaultAccount={ACCOUNT}")

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", [_find("slurmctld"), "-D", "-f", str(self.conf)])
        # Not a TCP probe: slurmctld logs a bare connect as "Zero Bytes were transmitted or received".
        self._wait("slurmctld", lambda: "UP" in self.run("scontrol", "ping", check=False).stdout, "slurmctld")

    def _start_slurmd(self) -> None:
        self._spawn("slurmd", [_find("slurmd"), "-D", "-f", str(self.conf)])

    def _wait_idle(self) -> None:
        def idle() -> bool:
            states = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.split()
            return bool(states) and all(state == "idle" for state in states)

        self._wait("the node to be idle in `sinfo`", idle, "slurmd")

    def _run_self_check(self) -> None:
        self.self_check_output = self.self_check()

    def self_check(self) -> str:
        """Run a step, and a batch job that checks its GPU env and a nested srun; return what sacct says.

        The nested ``srun`` runs without SLURM_CONF, as snakemake's jobstep runs it, so it proves the ROOT/bin
        wrappers work.  No ``sbatch --wait``: it polls at 2 s, then 8 s, and would make `up` 8 s slower.
        """
        self.run("srun", "-n1", "-t", "1", "true")
        gpus = min(2, self.gpus)
        want = ",".join(str(index) for index in range(gpus))
        script = (
            'echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES SLURM_JOB_GPUS=$SLURM_JOB_GPUS"; '
            f'test "$CUDA_VISIBLE_DEVICES" = "{want}" || exit 3; '
            "env -u SLURM_CONF srun -n1 true || exit 4"
        )
        request = ["-p", "gpu", f"--gpus={self.gpu_type}:{gpus}"] if gpus else []
        out = self.log_dir / "selfcheck-%j.out"
        job = self.run("sbatch", "--parsable", *request, "-t", "2", "-o", str(out), "--wrap", script)
        job_id = job.stdout.strip().split(";")[0]
        line = ""

        def finished() -> bool:
            nonlocal line
            line = self.sacct("-X", "-j", job_id, "-o", "State,AllocTRES", "-P", "-n").strip()
            return line.split("|")[0] in FINAL_STATES

        try:
            self._wait(f"self-check job {job_id} to finish in sacct", finished, "slurmd")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nlast sacct line: {line!r}") from None
        job_out = _tail(self.log_dir / f"selfcheck-{job_id}.out", 20)
        if not line.startswith("COMPLETED|") or (gpus and f"gres/gpu={gpus}" not in line):
            raise RuntimeError(f"self-check job {job_id}: sacct says {line!r}, job output {job_out!r}\n{self.logs()}")
        return f"job {job_id}: {line}\n{job_out}"

    # -- stop -----------------------------------------------------------------------------------------------

    def _running_daemons(self) -> list[str]:
        return [daemon for daemon in DAEMONS if self._live_pid(daemon) is not None]

    def _live_pid(self, daemon: str) -> int | None:
        """The daemon's pid if it still runs and is ours (checked by MARKER, so a recycled pid is never hit)."""
        try:
            pid = int(self._pid_file(daemon).read_text())
        except (OSError, ValueError):
            return None
        if _proc_alive(pid) and f"{MARKER}={self.root}" in _proc_environ(pid):
            return pid
        return None

    def stop(self) -> None:
        """Cancel jobs, shut Slurm down, stop every daemon and sweep leftovers.  Safe to call repeatedly."""
        if self._live_pid("slurmctld") is not None:
            with contextlib.suppress(RuntimeError):
                jobs = self.run("squeue", "-h", "-o", "%i", timeout=15, check=False).stdout.split()
                if jobs:
                    self.run("scancel", *jobs, timeout=15, check=False)
                    self._wait_gone(lambda: not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip(), 10)
                # Stops slurmctld and slurmd in an orderly way (state saved, job records sent to slurmdbd).
                self.run("scontrol", "shutdown", timeout=15, check=False)
                self._wait_gone(lambda: self._live_pid("slurmd") is None and self._live_pid("slurmctld") is None, 10)
        for daemon in DAEMONS:
            self._terminate(daemon)
        self._sweep()
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        if survivors := self._cluster_pids():
            raise RuntimeError(f"processes of the Slurm test cluster under {self.root} survived: {survivors}")

    @staticmethod
    def _wait_gone(done: Callable[[], bool], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not done():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def _terminate(self, daemon: str) -> None:
        """SIGTERM, then SIGKILL after a grace period (MariaDB may take a few seconds to flush)."""
        pid = self._live_pid(daemon)
        if pid is not None:
            self._signal(pid, signal.SIGTERM)
            proc = self._procs.get(daemon)
            gone = (lambda: proc.poll() is not None) if proc else (lambda: not _proc_alive(pid))
            if not self._wait_gone(gone, 10 if daemon == "mariadb" else 5):
                self._signal(pid, signal.SIGKILL)
                self._wait_gone(gone, 5)
        self._pid_file(daemon).unlink(missing_ok=True)

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _cluster_pids(self) -> list[int]:
        """Live processes of this cluster: those carrying its MARKER (the daemons and the slurmstepd slurmd
        forks), and their descendants (job processes, whose environment is the submitter's, not the marker's).
        """
        marker, me = f"{MARKER}={self.root}", os.getpid()
        children: dict[int, list[int]] = {}
        marked = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or (pid := int(entry.name)) == me or not _proc_alive(pid):
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1])
                children.setdefault(ppid, []).append(pid)
            if marker in _proc_environ(pid):
                marked.append(pid)
        found, todo = set(), marked
        while todo:
            pid = todo.pop()
            if pid not in found and pid != me:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return sorted(found)

    def _sweep(self) -> None:
        """Kill what the orderly shutdown missed, e.g. a slurmstepd and its job after slurmd crashed."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._cluster_pids()
            for pid in pids:
                self._signal(pid, sig)
            if not pids or self._wait_gone(lambda: not self._cluster_pids(), 3):
                return


def _iter_exports(cluster: SlurmCluster) -> Iterator[str]:
    for key, value in cluster.env.items():
        yield f"export {key}={shlex.quote(value)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down", "logs", "check"))
    parser.add_argument("root", type=Path)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-type", default="h200")
    parser.add_argument("--no-self-check", action="store_true")
    args = parser.parse_args(argv)
    cluster = SlurmCluster(args.root, args.gpus, args.gpu_type, self_check=not args.no_self_check)
    if args.action == "check":
        missing = missing_packages()
        print(install_hint(missing) if missing else f"all commands present; Slurm {cluster.version}")
        return 1 if missing else 0
    if args.action == "down":
        cluster.stop()
        print(f"stopped the cluster under {cluster.root}")
    elif args.action == "logs":
        print(cluster.logs())
    else:
        args.root.mkdir(parents=True, exist_ok=True)
        try:
            cluster.start()
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"Slurm {cluster.version} cluster {cluster.name} up under {cluster.root} in {cluster.up_seconds:.1f} s")
        print("  " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in cluster.timings.items()))
        if cluster.self_check_output:
            print(f"self-check: {cluster.self_check_output}")
        print("\n".join(_iter_exports(cluster)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
