"""Start an lmtune entry point on several processes: lmtune's ``gaudi_spawn.py``.

Stage contract: argv → one launcher command (torchrun, mpirun or deepspeed) that
starts ``--world_size`` copies of an lmtune entry point. Each copy then maps its
launcher's environment with :func:`lmtune.train.distributed.apply_launcher_env`.

Example:
    python -m lmtune.launch --world_size 4 --use_mpi finetune_clm.py \\
        --model_name_or_path ./tiny-llama --train_file data.json --no_cuda
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

from lmtune.errors import ConfigError, LmtuneError, UnsupportedError
from lmtune.train.cpu import allocator_preload
from lmtune.train.distributed import DEFAULT_MASTER_ADDR, threads_per_rank

Mode = Literal["torchrun", "mpi", "deepspeed"]
MpiFlavour = Literal["mpich", "openmpi"]
MODES: tuple[Mode, ...] = ("torchrun", "mpi", "deepspeed")
DEFAULT_MASTER_PORT = 29500

# Script name as users type it (".py" optional) → python -m module and leading arguments.
SCRIPT_MODULES: dict[str, tuple[str, ...]] = {
    "finetune_clm": ("lmtune.finetune_clm",),
    "finetune_seq2seq": ("lmtune.finetune_seq2seq",),
    "finetune": ("lmtune.cli", "finetune"),
    "finetune_dpo": ("lmtune.finetune_dpo",),
    "dpo_clm": ("lmtune.finetune_dpo",),  # the reference's DPO script name
    "dpo": ("lmtune.cli", "dpo"),
}
# `lmtune SUBCOMMAND` forms worth running on several processes (add "eval" when cli.py has it).
SUBCOMMANDS = ("finetune", "dpo")


class LaunchTarget(NamedTuple):
    """What each rank runs: ``python -m name args`` or ``python name args``."""

    name: str
    args: list[str]
    is_module: bool

    def python_argv(self) -> list[str]:
        """The command line of one rank."""
        return [sys.executable, *(["-m"] if self.is_module else []), self.name, *self.args]


@dataclass(frozen=True)
class LaunchArgs:
    """Parsed ``python -m lmtune.launch`` arguments, in build_launch_command's terms."""

    world_size: int
    mode: Mode
    script: str
    script_args: list[str]
    nnodes: int
    node_rank: int
    master_addr: str | None
    master_port: int
    hostfile: str | None


def _did_you_mean(value: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def resolve_target(script: str, script_args: list[str]) -> LaunchTarget:
    """Map the script the user typed to the module or file each rank runs.

    Args:
        script: ``finetune_clm``, ``finetune_seq2seq`` (``.py`` optional, as the
            reference's users type it), ``finetune`` or ``lmtune finetune``, or
            a path to a ``.py`` file.
        script_args: The arguments that follow the script.

    Returns:
        The launch target.

    Raises:
        ConfigError: Unknown script name, missing subcommand or missing file.
    """
    if script == "lmtune":
        if not script_args or script_args[0] not in SUBCOMMANDS:
            got = script_args[0] if script_args else "nothing"
            raise ConfigError(
                f"`lmtune` under the launcher needs a subcommand: one of {', '.join(SUBCOMMANDS)} "
                f"(got {got}).{_did_you_mean(got, SUBCOMMANDS)} Fix: lmtune finetune ARGS."
            )
        script, script_args = script_args[0], script_args[1:]
    key = script.removeprefix("./").removesuffix(".py")
    if key in SCRIPT_MODULES:
        module, *leading = SCRIPT_MODULES[key]
        return LaunchTarget(module, [*leading, *script_args], is_module=True)
    if script.endswith(".py") and os.path.isfile(script):
        return LaunchTarget(script, list(script_args), is_module=False)
    names = [*SCRIPT_MODULES, "lmtune"]
    problem = f"script file {script!r} does not exist" if script.endswith(".py") else f"unknown script {script!r}"
    raise ConfigError(
        f"{problem}; allowed: {', '.join(names)} (with or without .py) or the path of a .py "
        f"file.{_did_you_mean(key, names)}"
    )


def detect_mpi_flavour(mpirun: str = "mpirun") -> MpiFlavour:
    """Tell Open MPI's mpirun from MPICH/Intel MPI's (Hydra) by its ``--version`` output.

    Raises:
        UnsupportedError: ``mpirun`` cannot be run.
    """
    try:
        result = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UnsupportedError(f"cannot run `{mpirun} --version` ({err}). {_MPIRUN_FIX}") from err
    output = result.stdout + result.stderr
    return "openmpi" if "Open MPI" in output or "OpenRTE" in output else "mpich"


_MPIRUN_FIX = (
    "Fix: install an MPI (Debian/Ubuntu: apt-get install mpich), or source Intel oneAPI's or the "
    "oneCCL bindings' setvars.sh, which puts Intel MPI's mpirun on PATH; or use --use_torchrun."
)


def _require(executable: str, flag: str, fix: str) -> None:
    if shutil.which(executable) is None:
        raise UnsupportedError(f"{flag} needs `{executable}` on PATH, which is not installed here. {fix}")


def _validate(world_size: int, mode: str, nnodes: int, node_rank: int, master_addr: str | None,
              master_port: int, hostfile: str | None) -> None:
    """Collect every problem with the launch arguments and raise them together."""
    problems = []
    if mode not in MODES:
        problems.append(f"mode must be one of {', '.join(MODES)} (got {mode!r}){_did_you_mean(mode, MODES)}")
    if world_size < 1:
        problems.append(f"--world_size must be >= 1 (got {world_size})")
    if nnodes < 1:
        problems.append(f"--nnodes must be >= 1 (got {nnodes})")
    elif world_size % nnodes:
        problems.append(f"--world_size ({world_size}) must be a multiple of --nnodes ({nnodes})")
    if not 0 <= node_rank < max(nnodes, 1):
        problems.append(f"--node_rank must be in [0, --nnodes) = [0, {nnodes}) (got {node_rank})")
    if not 1 <= master_port <= 65535:
        problems.append(f"--master_port must be 1-65535 (got {master_port})")
    if hostfile is not None and mode == "torchrun":
        problems.append("--hostfile is read by --use_mpi and --use_deepspeed only; with torchrun "
                        "run the command on every node with its --node_rank")
    elif hostfile is not None and not os.path.isfile(hostfile):
        problems.append(f"--hostfile {hostfile!r} does not exist")
    if mode == "mpi" and node_rank != 0:
        problems.append(f"--node_rank is not used with --use_mpi (got {node_rank}): mpirun starts "
                        "every node from node 0; list the nodes with --hostfile")
    multi_node = nnodes > 1 or (mode == "mpi" and hostfile is not None)
    if multi_node and mode != "deepspeed" and not master_addr:
        problems.append("a multi-node launch needs --master_addr <node 0's IP address> "
                        "(or export MASTER_ADDR)")
    if problems:
        raise ConfigError("cannot build the launch command: " + "; ".join(problems) + ".")


def build_launch_command(
    world_size: int,
    mode: Mode,
    script: str,
    script_args: list[str],
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int = DEFAULT_MASTER_PORT,
    hostfile: str | None = None,
    mpi_flavour: MpiFlavour | None = None,
    euid: int | None = None,
) -> list[str]:
    """Build the argv that starts ``world_size`` ranks of an lmtune entry point.

    Args:
        world_size: Total number of processes, over all nodes.
        mode: "torchrun" (``python -m torch.distributed.run``; run it on every
            node), "mpi" (``mpirun``, started once on node 0) or "deepspeed".
        script: See :func:`resolve_target`.
        script_args: Arguments for the script.
        nnodes: Number of nodes; ``world_size`` is split evenly between them.
        node_rank: This node's index, for torchrun and ssh-less deepspeed.
        master_addr: Rank 0's address; required on several nodes (except for
            deepspeed, which finds it itself); 127.0.0.1 on one node.
        master_port: Rank 0's TCP port.
        hostfile: MPI or deepspeed hostfile listing the nodes.
        mpi_flavour: "mpich" (also Intel MPI) or "openmpi"; detected from
            ``mpirun --version`` when None.
        euid: The effective user id mpirun runs as; ``os.geteuid()`` when None.
            Open MPI's mpirun refuses root unless told ``--allow-run-as-root``.

    Returns:
        The command to run.

    Raises:
        ConfigError: Inconsistent arguments (all problems in one message), or an
            unknown script.
        UnsupportedError: ``mpirun`` or ``deepspeed`` is not installed.
    """
    _validate(world_size, mode, nnodes, node_rank, master_addr, master_port, hostfile)
    target = resolve_target(script, script_args)
    per_node = world_size // nnodes
    if mode == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc_per_node", str(per_node), "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--master_addr", master_addr or DEFAULT_MASTER_ADDR, "--master_port", str(master_port),
            *(["-m"] if target.is_module else []), target.name, *target.args,
        ]  # fmt: skip
    if mode == "mpi":
        _require("mpirun", "--use_mpi", _MPIRUN_FIX)
        flavour = mpi_flavour or detect_mpi_flavour()
        command = _mpi_command(flavour, world_size, per_node, nnodes, master_addr, master_port, hostfile, target)
        return _allow_root(command, flavour, _effective_uid() if euid is None else euid)
    _require("deepspeed", "--use_deepspeed", _DEEPSPEED_FIX)
    return [
        "deepspeed", "--num_nodes", str(nnodes), "--num_gpus", str(per_node),
        "--master_port", str(master_port),
        *(["--master_addr", master_addr] if master_addr else []),
        *(["--hostfile", hostfile] if hostfile else []),
        # Without a hostfile there is no ssh fan-out: each node runs its own launcher, as torchrun does.
        *(["--no_ssh", "--node_rank", str(node_rank)] if nnodes > 1 and not hostfile else []),
        "--no_local_rank",  # ranks read LOCAL_RANK from the environment
        *(["--module"] if target.is_module else []), target.name, *target.args,
    ]  # fmt: skip


_DEEPSPEED_FIX = (
    "Fix: pip install deepspeed (on Gaudi, Habana's DeepSpeed fork as optimum-habana's install "
    "guide says), or use --use_torchrun or --use_mpi."
)


def _mpi_command(flavour: MpiFlavour, world_size: int, per_node: int, nnodes: int, master_addr: str | None,
                 master_port: int, hostfile: str | None, target: LaunchTarget) -> list[str]:
    env = {"MASTER_ADDR": master_addr or DEFAULT_MASTER_ADDR, "MASTER_PORT": str(master_port)}
    command = ["mpirun", "-n", str(world_size)]
    if flavour == "openmpi":
        # Open MPI forwards only the variables named with -x to the ranks.
        command += ["--map-by", f"ppr:{per_node}:node"] if nnodes > 1 else []
        command += ["--hostfile", hostfile] if hostfile else []
        command += [arg for name, value in env.items() for arg in ("-x", f"{name}={value}")]
    else:
        command += ["-ppn", str(per_node)] if nnodes > 1 else []
        command += ["-f", hostfile] if hostfile else []
        command += [arg for name, value in env.items() for arg in ("-genv", name, value)]
    return command + target.python_argv()


def _effective_uid() -> int:
    # Windows has no geteuid, and no Open MPI mpirun to refuse root either.
    return os.geteuid() if hasattr(os, "geteuid") else -1


def _allow_root(command: list[str], flavour: MpiFlavour, euid: int) -> list[str]:
    """Add ``--allow-run-as-root`` to an Open MPI command started by root (containers run as root).

    Open MPI's mpirun exits at once as root without it; MPICH's Hydra has no such flag and
    would reject it.
    """
    if flavour != "openmpi" or euid != 0:
        return command
    return [command[0], "--allow-run-as-root", *command[1:]]


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting, so main() reports it once."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}. Fix: {self.prog} --help lists the flags.")


def _build_parser(prog: str = "python -m lmtune.launch") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Start an lmtune entry point on several processes (lmtune's gaudi_spawn.py).",
        allow_abbrev=False,
    )
    parser.add_argument("--world_size", type=int, default=1, help="Processes over all nodes.")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--use_torchrun", action="store_true", help="Launch with torchrun (the default).")
    modes.add_argument("--use_mpi", action="store_true", help="Launch with mpirun.")
    modes.add_argument("--use_deepspeed", action="store_true", help="Launch with the deepspeed launcher.")
    parser.add_argument("--nnodes", type=int, default=1, help="Number of nodes.")
    parser.add_argument("--node_rank", type=int, default=0, help="This node's index (torchrun, deepspeed).")
    parser.add_argument("--master_addr", default=None, help="Rank 0's address (default: $MASTER_ADDR, "
                        "else the first host of --hostfile for mpirun, else 127.0.0.1).")
    parser.add_argument("--master_port", type=int, default=None,
                        help=f"Rank 0's port (default: $MASTER_PORT, else {DEFAULT_MASTER_PORT}).")
    parser.add_argument("--hostfile", default=None, help="Hostfile listing the nodes (mpirun, deepspeed).")
    parser.add_argument("script", help="finetune_clm[.py], finetune_seq2seq[.py], lmtune finetune, "
                        "or a .py file.")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="Arguments for the script.")
    return parser


def first_host(hostfile: str) -> str:
    """The first host a hostfile lists: where mpirun puts rank 0.

    Accepts MPICH (``host[:slots]``) and Open MPI (``host slots=N``) lines and ``#`` comments.

    Raises:
        ConfigError: The file lists no host.
    """
    with open(hostfile, encoding="utf-8") as lines:
        for line in lines:
            fields = line.split("#", 1)[0].split()
            if fields:
                return fields[0].split(":", 1)[0]
    raise ConfigError(f"--hostfile {hostfile!r} lists no host. Fix: one node address per line, node 0 first.")


def parse_launch_args(argv: list[str] | None = None, prog: str = "python -m lmtune.launch") -> LaunchArgs:
    """Parse ``python -m lmtune.launch`` (``lmtune launch``) arguments, filling defaults from the environment.

    Raises:
        ConfigError: Bad or conflicting flags, a bad MASTER_PORT, or an empty hostfile.
    """
    ns = _build_parser(prog).parse_args(argv)
    mode: Mode = "mpi" if ns.use_mpi else "deepspeed" if ns.use_deepspeed else "torchrun"
    master_addr = ns.master_addr or os.environ.get("MASTER_ADDR") or None
    if master_addr is None and mode == "mpi" and ns.hostfile and os.path.isfile(ns.hostfile):
        master_addr = first_host(ns.hostfile)
    master_port = ns.master_port
    if master_port is None:
        env_port = os.environ.get("MASTER_PORT", "").strip() or str(DEFAULT_MASTER_PORT)
        if not env_port.isdigit():
            raise ConfigError(f"MASTER_PORT must be a port number (got {env_port!r}). "
                              "Fix: pass --master_port or fix the variable.")
        master_port = int(env_port)
    return LaunchArgs(ns.world_size, mode, ns.script, list(ns.script_args), ns.nnodes, ns.node_rank,
                      master_addr, master_port, ns.hostfile)


def _name(prog: str) -> str:
    """``python -m lmtune.launch`` → ``lmtune.launch``: the prefix of this command's messages."""
    return prog.removeprefix("python -m ")


def main(argv: list[str] | None = None, prog: str = "python -m lmtune.launch") -> int:
    """Build the launcher command, print it, run it and return its exit code.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.
        prog: The command's name in messages (``lmtune launch`` from the CLI).

    Returns:
        The launcher's exit code; 2 when the arguments are wrong or the launcher
        is missing (the message goes to stderr); 128+N when killed by signal N.
    """
    try:
        args = parse_launch_args(argv, prog)
        command = build_launch_command(**asdict(args))
    except LmtuneError as err:
        print(f"{_name(prog)}: error: {err}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    prefix = ""
    if args.mode == "torchrun" and "OMP_NUM_THREADS" not in env:
        # torchrun would export OMP_NUM_THREADS=1 to every rank; share the cores instead.
        threads = threads_per_rank(args.world_size // args.nnodes)
        env["OMP_NUM_THREADS"] = str(threads)
        prefix = f"OMP_NUM_THREADS={threads} "
    if (preload := allocator_preload(env)) is not None:  # LMTUNE_ALLOCATOR=jemalloc (lmtune/train/cpu.py)
        env["LD_PRELOAD"] = preload
        prefix += f"LD_PRELOAD={preload} "
    print(f"{_name(prog)}: running: {prefix}{shlex.join(command)}", flush=True)
    returncode = subprocess.run(command, env=env, check=False).returncode
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main())
