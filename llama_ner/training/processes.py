"""Processes and launchers: joining the other ranks (deepspeed, mpirun, several machines), rank, world size,
barriers, this process's device.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch

from llama_ner.io_utils import UserError
from llama_ner.training.train_config import TRAIN_DEFAULTS


def train_device() -> str:
    """This process's device: its GPU under a launcher (LOCAL_RANK), else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def init_distributed(timeout_s: float = TRAIN_DEFAULTS["ddp_timeout"]) -> None:
    """One process per rank under deepspeed/torchrun (env) or mpirun (mpi4py discovery); or just one.

    Joining waits at most `timeout_s` for the other processes (so does every later exchange):
    a machine that cannot reach the master, or a wrong --node_rank, fails with what to check.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launched = any(key in os.environ for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
    default_port = 29500 if launched else free_port()  # a lone `python x.py` must not collide with a running job
    try:
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(),
            auto_mpi_discovery=True,
            distributed_port=int(os.environ.get("MASTER_PORT", default_port)),  # mpirun -x MASTER_PORT=... picks one
            timeout=timedelta(seconds=timeout_s),
        )
    except RuntimeError as err:  # torch's store and gloo/NCCL connection errors and timeouts
        raise UserError(join_error(err, timeout_s)) from None
    remove_shm_buffer()


def remove_shm_buffer() -> None:
    """DeepSpeed's CPU allreduce maps a 66 MB /dev/shm file per rank when all ranks share a machine
    (LOCAL_SIZE) and never removes it: every `deepspeed --num_gpus N` run left N of them in RAM until reboot.
    Once every rank has mapped its peers' files (the barrier), each removes its own; the mappings live on."""
    if "LOCAL_SIZE" not in os.environ or not torch.distributed.is_initialized():
        return
    barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank()}"  # deepspeed's shm.cpp names it so
    Path("/dev/shm", name).unlink(missing_ok=True)


def join_error(err: Exception, timeout_s: float) -> str:
    """One line: who failed to join whom, torch's reason, and what to check on a multi-machine run."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    reason = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
    if "EADDRINUSE" in str(err) or "address already in use" in str(err).lower():
        port = os.environ.get("MASTER_PORT", "?")
        return (
            f"port {port} on {os.environ.get('MASTER_ADDR', '127.0.0.1')} is taken (another training on this "
            f"machine?): pick a free one, e.g. deepspeed --master_port {free_port()} ... (torchrun: --master_port, "
            "mpirun: -x MASTER_PORT=N), or stop the run that holds it"
        )
    return (
        f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')} could not join the other "
        f"processes at MASTER_ADDR:MASTER_PORT={where} within ddp_timeout={timeout_s:g}s ({reason}). Check that "
        "every machine can reach that address and port (firewall), that each machine was started with its own "
        "--node_rank (0 on the master) and the same --master_addr, --master_port and hostfile, and that "
        "GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME name the interface of that network; raise ddp_timeout if a "
        "machine starts much later than the others"
    )


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def leave_distributed() -> None:
    """Every rank done, the process group closed: one left open at exit tears gloo's threads down while they
    run ('terminate called without an active exception', exit 250 from the launcher after a finished run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
