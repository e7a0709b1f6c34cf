"""Training on two machines, with two real network hosts on this one.

Two Linux network namespaces joined by a veth pair are two hosts: each has its own network
stack, its own private address on the link (nothing else but loopback), and one training
process. The trainers find each other over that link with gloo, exactly as two machines do
over Ethernet; only the filesystem is shared (like a shared `save_dir` on NFS). Needs root
and `ip netns` (skipped, with the reason, where either is missing; CI runs as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_train
from conftest import ROOT
from test_train import DS_JSON, PYTHON, VENV_BIN, check_adapter, deepspeed_cmd, run

deepspeed_ops = test_train.deepspeed_ops  # fixtures: DeepSpeed's op build (in the background), 12 MSRA rows
rows12 = test_train.rows12

NS_PREFIX = "lorahost"  # namespaces are named lorahost<pid>x<hex>-<i>: unique per run, stale ones are findable
ADDRESSES = ["10.213.7.1", "10.213.7.2"]  # private, and only inside our own two namespaces
RUN_TIMEOUT = 600  # seconds for a whole two-host run (start-up included) before the test fails


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def remove_stale_namespaces() -> None:
    """Delete namespaces left by test runs whose process is gone (a killed pytest cannot clean up)."""
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        pid = name[len(NS_PREFIX) :].split("x")[0]
        if name.startswith(NS_PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            ip("netns", "del", name)


def session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
    return members


class TwoHosts:
    """Two namespaces joined by a veth link: host i is namespace ns[i] at ADDRESSES[i].

    Both ends of the link have one name, `iface` (like eth1 on every machine of a cluster): one
    GLOO_SOCKET_IFNAME serves every host, as `mpirun -x GLOO_SOCKET_IFNAME=...` passes it.
    """

    def __init__(self) -> None:
        tag = f"{os.getpid()}x{secrets.token_hex(2)}"
        self.ns = [f"{NS_PREFIX}{tag}-{i}" for i in range(2)]
        self.iface = f"lh{tag}"[-15:]  # interface names: 15 characters at most, unique per namespace
        self.procs: list[subprocess.Popen] = []

    def create(self) -> None:
        """Build the link; skip the test (after cleaning up) when this machine cannot."""
        steps = [("netns", "add", self.ns[0]), ("netns", "add", self.ns[1])]
        steps.append(("link", "add", self.iface, "netns", self.ns[0], "type", "veth"))
        steps[-1] += ("peer", "name", self.iface, "netns", self.ns[1])
        for i in range(2):
            steps.append(("-n", self.ns[i], "addr", "add", f"{ADDRESSES[i]}/12", "dev", self.iface))
            steps.append(("-n", self.ns[i], "link", "set", self.iface, "up"))
            steps.append(("-n", self.ns[i], "link", "set", "lo", "up"))  # a new namespace's loopback is down
        for step in steps:
            proc = ip(*step)
            if proc.returncode != 0:
                self.delete()
                pytest.skip(f"two-host tests need root and `ip netns`: `ip {' '.join(step)}` failed: {proc.stderr}")

    def start(self, i: int, cmd: list[str], log: Path, disk: tuple[Path, Path] | None = None) -> subprocess.Popen:
        """Run `cmd` on host i from the repo root; gloo uses that host's veth interface.

        disk=(own, path): this host sees its own folder `own` at `path` (a per-machine disk).
        """
        if disk is not None:  # `ip netns exec` gives the command its own mount namespace
            cmd = ["sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", *map(str, disk), *cmd]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": self.iface}
        with open(log, "w") as out:
            proc = subprocess.Popen(
                self.on_host(i, cmd),
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own session: kill() takes the launcher and all it started
            )
        self.procs.append(proc)
        return proc

    def on_host(self, i: int, cmd: list[str]) -> list[str]:
        """`cmd` on host i: in its network namespace, under its own hostname like a machine (DeepSpeed
        under mpirun counts a machine's processes by hostname)."""
        hostname = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.ns[i]]
        return ["ip", "netns", "exec", self.ns[i], *hostname, *cmd]

    def write_rsh_agent(self, path: Path) -> Path:
        """Open MPI's stand-in for ssh (`--mca plm_rsh_agent path`): `path HOST COMMAND...` runs the
        command on that host with an empty environment, as ssh would: only what mpirun passes with -x
        gets there."""
        env = 'env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME="$HOME"'
        cases = [
            f'  {a}) shift; exec {env} {shlex.join(self.on_host(i, ["sh", "-c"]))} "$*" ;;\n'
            for i, a in enumerate(ADDRESSES)
        ]
        path.write_text(
            f'#!/bin/sh\ncase "$1" in\n{"".join(cases)}  *) echo "no such host: $1" >&2; exit 255 ;;\nesac\n'
        )
        path.chmod(0o755)
        return path

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL everything in the launcher's session (mpirun puts its daemons and ranks in process
        groups of their own); a few passes, for what was forked meanwhile."""
        for _ in range(3):
            for pid in session_members(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait()

    def delete(self) -> None:
        for proc in self.procs:
            self.kill(proc)
        for ns in self.ns:
            ip("netns", "del", ns)


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0:
        pytest.skip("two-host tests need root (they create network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("two-host tests need `ip` (iproute2) for network namespaces")
    remove_stale_namespaces()
    pair = TwoHosts()
    pair.create()
    try:
        yield pair
    finally:
        pair.delete()


@pytest.fixture(scope="module")
def ops_built(deepspeed_ops):
    _, err = deepspeed_ops.communicate(timeout=600)
    assert deepspeed_ops.returncode == 0, err[-2000:]


PORTS = iter(range(29600, 29700))  # inside our own namespaces: no other job can hold them


def launch_cmd(launcher: str, node_rank: int, port: int, hostfile: Path, master: str, script: str) -> list[str]:
    """What a user types on machine `node_rank` (the script's arguments follow)."""
    if launcher == "deepspeed":
        cmd = [str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank)]
    else:
        cmd = [str(VENV_BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank)]
    return [*cmd, "--master_addr", master, "--master_port", str(port), f"{script}.py"]


def start_on_two_hosts(
    hosts: TwoHosts,
    tmp_path: Path,
    launcher: str,
    script: str,
    argv: list[str],
    node_ranks: tuple[int | None, int | None] = (0, 1),
    master: str = ADDRESSES[0],
    disks: list[tuple[Path, Path]] | None = None,
) -> list[tuple[subprocess.Popen, Path]]:
    """One launcher per host (node_rank None: nothing on that host); (process, log file) each."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{address} slots=1\n" for address in ADDRESSES))
    port = next(PORTS)
    started = []
    for i, node_rank in enumerate(node_ranks):
        if node_rank is not None:
            cmd = [*launch_cmd(launcher, node_rank, port, hostfile, master, script), *argv]
            log = tmp_path / f"host{i}-{port}.log"
            started.append((hosts.start(i, cmd, log, disks[i] if disks else None), log))
    return started


def wait_all(hosts: TwoHosts, started: list[tuple[subprocess.Popen, Path]]) -> list[tuple[int, str]]:
    """Wait for every started process (killing all after RUN_TIMEOUT): (exit code, output) each."""
    deadline = time.time() + RUN_TIMEOUT
    results = []
    for proc, log in started:
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for other, _ in started:
                hosts.kill(other)
            pytest.fail(f"still running after {RUN_TIMEOUT}s:\n{log.read_text()[-3000:]}")
        results.append((proc.returncode, log.read_text()))
    return results


def run_on_two_hosts(hosts: TwoHosts, tmp_path: Path, *args, **kwargs) -> list[tuple[int, str]]:
    return wait_all(hosts, start_on_two_hosts(hosts, tmp_path, *args, **kwargs))


def train_argv(model_dir: Path, rows: Path, save_dir: Path, *extra: str) -> list[str]:
    """A short fp32 run (12 steps of 2 x 1 rows, saves at 4 and 8), dropout 0: same seed and data everywhere."""
    argv = [f"model_dir={model_dir}", f"train_path={rows}", "dev_path=", f"save_dir={save_dir}"]
    argv += ["train_batch_size=1", "num_train_epochs=2", "save_steps=4", "log_steps=4", "learning_rate=1e-3"]
    return [*argv, "lora_dropout=0", f"deepspeed_json_path={DS_JSON}", *extra]


def assert_ok(results: list[tuple[int, str]]) -> str:
    for i, (code, out) in enumerate(results):
        assert code == 0, f"host {i} exit {code}\n{out[-4000:]}"
    return results[0][1]


def assert_same_adapter(got: Path, want: Path, **tolerance) -> None:
    got_w = load_file(got / "adapter_model.safetensors")
    want_w = load_file(want / "adapter_model.safetensors")
    assert set(got_w) == set(want_w)
    for name in want_w:
        torch.testing.assert_close(got_w[name], want_w[name], **(tolerance or {"rtol": 0, "atol": 0}), msg=name)


@pytest.fixture(scope="module")
def one_host_two_processes(ops_built, tiny_alpaca, rows12, tmp_path_factory):
    """The reference: each trainer on 1 host x 2 processes (`deepspeed --num_gpus 2`)."""

    def train(script: str) -> Path:
        save_dir = tmp_path_factory.mktemp(f"{script}_1x2")
        out = run([*deepspeed_cmd(f"{script}.py"), *train_argv(tiny_alpaca, rows12, save_dir)])
        assert "done: 12 steps" in out
        return save_dir / "adapter_model"

    cache: dict[str, Path] = {}

    def adapter(script: str) -> Path:
        if script not in cache:
            cache[script] = train(script)
        return cache[script]

    return adapter


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, script, disks",
    [
        ("deepspeed", "train_trainer", "shared"),  # deepspeed --no_ssh with train_deepspeed: the resume test
        ("torchrun", "train_deepspeed", "per machine"),
    ],
)
def test_two_hosts_train_the_adapter_of_one_host_with_two_processes(
    hosts,
    one_host_two_processes,
    tiny_alpaca,
    rows12,
    tmp_path,
    launcher,
    script,
    disks,
):
    """deepspeed --no_ssh --node_rank I (or torchrun --nnodes 2) once per host: the adapter of 1 x 2 processes."""
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    own = [tmp_path / f"host{i}_disk" for i in range(2)]
    for folder in own:
        folder.mkdir()
    mounts = [(folder, save_dir) for folder in own] if disks == "per machine" else None
    argv = train_argv(tiny_alpaca, rows12, save_dir)
    out = assert_ok(run_on_two_hosts(hosts, tmp_path, launcher, script, argv, disks=mounts))
    assert "done: 12 steps" in out
    adapter = (own[0] if mounts else save_dir) / "adapter_model"
    check_adapter(adapter, tiny_alpaca)
    assert_same_adapter(adapter, one_host_two_processes(script))
    if mounts:  # only rank 0 writes the adapter; machine 1 keeps its own share of the optimizer state
        assert not (own[1] / "adapter_model").exists() and list(own[1].glob("deepspeed_checkpoint/*/*optim*"))
        assert not list(save_dir.iterdir())  # nothing went to the shared path


@pytest.mark.slow
def test_both_hosts_killed_mid_run_resume(hosts, one_host_two_processes, tiny_alpaca, rows12, tmp_path):
    """deepspeed --no_ssh on both hosts, both killed after a save, both started again with resume=true.

    The run ends at the same step with the adapter of the uninterrupted 1 x 2 run (equal here: fp32,
    dropout 0, the optimizer state and data position restored).
    """
    save_dir = tmp_path / "run"
    argv = train_argv(tiny_alpaca, rows12, save_dir)
    procs = [proc for proc, _ in start_on_two_hosts(hosts, tmp_path, "deepspeed", "train_deepspeed", argv)]
    state_file = save_dir / "adapter_model" / "resume_state.json"
    deadline = time.time() + RUN_TIMEOUT
    while not state_file.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    for proc in procs:
        hosts.kill(proc)  # mid-run, right after the first save
    saved = json.loads(state_file.read_text())
    assert 4 <= saved["global_step"] < 12, saved
    out = assert_ok(run_on_two_hosts(hosts, tmp_path, "deepspeed", "train_deepspeed", [*argv, "resume=true"]))
    assert f"at step {saved['global_step']}/12" in out and "done: 12 steps" in out
    assert json.loads(state_file.read_text())["global_step"] == 12
    adapter = save_dir / "adapter_model"
    check_adapter(adapter, tiny_alpaca)
    assert_same_adapter(adapter, one_host_two_processes("train_deepspeed"), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_host_that_cannot_join_fails_within_ddp_timeout(hosts, ops_built, tiny_alpaca, rows12, tmp_path):
    """No hang: each process gives up after ddp_timeout seconds and says what to check.

    Two cases at once (different ports): host 1 alone, pointed at an address on the link that no
    host has; and both hosts started with --node_rank 0.
    """
    argv = [*train_argv(tiny_alpaca, rows12, tmp_path / "run"), "ddp_timeout=10"]
    start = time.time()
    started = start_on_two_hosts(hosts, tmp_path, "deepspeed", "train_deepspeed", argv, (None, 1), "10.213.7.3")
    started += start_on_two_hosts(hosts, tmp_path, "deepspeed", "train_deepspeed", argv, (0, 0))
    results = wait_all(hosts, started)
    elapsed = time.time() - start
    for code, out in results:
        assert code == 2, out[-3000:]
        assert "could not join the other processes" in out and "within ddp_timeout=10s" in out, out[-3000:]
        assert "--node_rank" in out and "GLOO_SOCKET_IFNAME" in out
    assert "MASTER_ADDR:MASTER_PORT=10.213.7.3:" in results[0][1]
    assert elapsed < 240, f"took {elapsed:.0f}s to give up with ddp_timeout=10"
    assert not (tmp_path / "run" / "adapter_model").exists()


@pytest.mark.slow
def test_mpirun_on_host_0_starts_host_1_and_trains_the_adapter_of_one_host(
    hosts, one_host_two_processes, tiny_alpaca, rows12, tmp_path
):
    """Launch d): one mpirun on host 0; Open MPI starts host 1's process through its rsh agent.

    The agent (the test's ssh) only runs Open MPI's own command (orted) in host 1's namespace with an
    empty environment; orted, mpi4py, DeepSpeed's MPI discovery and gloo over the link are real.
    """
    save_dir = tmp_path / "run"
    cmd = ["mpirun", "--allow-run-as-root", "-np", "2", "--host", ",".join(f"{a}:1" for a in ADDRESSES)]
    cmd += ["--mca", "plm_rsh_agent", str(hosts.write_rsh_agent(tmp_path / "rsh_agent"))]
    cmd += ["-x", f"MASTER_PORT={next(PORTS)}", "-x", f"GLOO_SOCKET_IFNAME={hosts.iface}"]
    # torch's threads of the reference's processes (under mpirun torch starts 1, bound to 1 core): sums in fp32
    # round the same only on the same number of threads
    cmd += ["--bind-to", "none", "-x", f"OMP_NUM_THREADS={torch.get_num_threads()}"]
    if "TORCH_EXTENSIONS_DIR" in os.environ:  # host 1 loads the ops that ops_built built, not another copy
        cmd += ["-x", "TORCH_EXTENSIONS_DIR"]
    where = 'hostname -I > "$0/rank$OMPI_COMM_WORLD_RANK.address" && exec "$@"'  # each rank's host address
    cmd += ["sh", "-c", where, str(tmp_path), PYTHON, "train_deepspeed.py", *train_argv(tiny_alpaca, rows12, save_dir)]
    log = tmp_path / "mpirun.log"
    out = assert_ok(wait_all(hosts, [(hosts.start(0, cmd, log), log)]))
    assert "done: 12 steps" in out
    assert [(tmp_path / f"rank{r}.address").read_text().split() for r in range(2)] == [[a] for a in ADDRESSES]
    adapter = save_dir / "adapter_model"
    check_adapter(adapter, tiny_alpaca)
    assert_same_adapter(adapter, one_host_two_processes("train_deepspeed"))
