"""Starting a distributed measurement: ``launch`` runs ``torchrun`` with this process's
command line (``--nproc N`` taken out), ``launch_command`` prints the equivalent command for
reports, and ``main`` is the worker entry without the CLI (``python -m
dbprofile.measure.distributed``: tests and benchmarks)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

import torch.distributed as dist

from dbprofile.measure.distributed.group import DEFAULT_TIMEOUT_S
from dbprofile.measure.distributed.ranks import run_distributed
from dbprofile.spec import SpecError


def launch(
    nproc: int,
    argv: Sequence[str],
    *,
    entry: str = "dbprofile.cli:main",
    torchrun_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> int:
    """Run ``entry`` (the dbprofile CLI by default) under ``python -m torch.distributed.run
    --standalone --nproc-per-node nproc`` with ``argv`` minus any ``--nproc``; returns its exit code.

    ``torchrun_args`` go to torchrun before the program (e.g. ``["--nnodes", "2", ...]`` for several
    machines; ``--standalone`` is then left out).
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise SpecError(f"--nproc must be a positive number of processes; got {nproc!r}.")
    args = strip_nproc(list(argv))
    module, _, func = entry.partition(":")
    code = f"import sys; from {module} import {func or 'main'} as _m; sys.exit(_m())"
    rendezvous = list(torchrun_args) or ["--standalone"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc-per-node={nproc}",
        "--no-python",
        sys.executable,
        "-c",
        code,
        *args,
    ]
    run_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, env=run_env).returncode


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without ``--nproc N`` / ``--nproc=N`` (the launched ranks must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def launch_command(nproc: int, argv: Sequence[str]) -> str:
    """The torchrun command line equivalent to ``launch(nproc, argv)``, for reports and docs."""
    return shlex.join(
        ["torchrun", "--standalone", f"--nproc-per-node={nproc}", "$(which dbprofile)", *strip_nproc(list(argv))]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dbprofile.measure.distributed MODEL -t TECHS -b N [--fsdp] [--tp N] [--out F]``: the
    worker entry without the CLI (tests, benchmarks); rank 0 writes the JSON, nothing is printed."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dbprofile.measure.distributed")
    parser.add_argument("model")
    parser.add_argument("-t", "--techniques", required=True)
    parser.add_argument("-b", "--batch-size", type=int, default=8)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    args = parser.parse_args(argv)
    try:
        run_distributed(
            args.model,
            args.techniques,
            args.batch_size,
            fsdp=args.fsdp,
            device=args.device,
            steps=args.steps,
            out=args.out,
            timeout_s=args.timeout,
            tp=args.tp,
        )
    except SpecError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
