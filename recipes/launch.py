"""Start one machine of a multi-machine job: prints and runs this machine's `accelerate launch` command.

    python recipes/launch.py --num_machines N --machine_rank R --main_process_ip HOST --processes_per_machine G \
        [--config_file accelerate_configs/zero3.yaml] [--main_process_port P] [--accelerate_args "..."] [--print] \
        RECIPE [RECIPE ARGS ...]

Run it on every machine with the same arguments but its own --machine_rank (0 on the machine at HOST). Under Slurm,
accelerate_configs/slurm/launch.sbatch runs it once per node through srun, and the Slurm variables give the machine
options: SLURM_NNODES, SLURM_NODEID, the first host of SLURM_JOB_NODELIST, SLURM_GPUS_ON_NODE, and a port derived
from SLURM_JOB_ID. `--print` prints the command without running it. docs/multinode.md explains the rest.

This file imports neither torch nor apertus_hf: it starts at once on every node, stays outside the package's layers,
and is the one place the command is built, for the Slurm script, the plain multi-machine form and the tests alike.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_ROOT / "accelerate_configs" / "zero3.yaml"
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class MachineLaunch:
    """One machine's share of a job: `processes_per_machine` processes of `num_machines * processes_per_machine`."""

    recipe: str
    """The training script, e.g. recipes/pretrain.py."""
    recipe_args: tuple[str, ...]
    """Its arguments, e.g. ("--config", "recipes/configs/8b/pretrain.yaml")."""
    num_machines: int
    machine_rank: int
    """0 on the machine at main_process_ip."""
    main_process_ip: str
    """Host name or address of machine 0, reachable from every machine; it serves the rendezvous store."""
    main_process_port: int
    processes_per_machine: int
    """One per GPU."""
    config_file: str = str(DEFAULT_CONFIG_FILE)
    """The accelerate config: the engine (zero3.yaml, ddp.yaml, ...); the machine options here override its own."""
    accelerate_args: tuple[str, ...] = ()
    """Further `accelerate launch` options, e.g. ("--mixed_precision", "no") on CPUs."""

    def __post_init__(self):
        if self.num_machines < 1 or self.processes_per_machine < 1:
            raise ValueError(
                f"num_machines={self.num_machines} and processes_per_machine={self.processes_per_machine} must both "
                "be at least 1."
            )
        if not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(
                f"machine_rank={self.machine_rank} is not one of the {self.num_machines} machines' ranks 0.."
                f"{self.num_machines - 1}: give each machine its own rank, 0 on the one at --main_process_ip."
            )

    @property
    def num_processes(self) -> int:
        return self.num_machines * self.processes_per_machine

    def command(self) -> list[str]:
        """The `accelerate launch` command line of this machine, with this interpreter."""
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            self.config_file,
            "--num_machines",
            str(self.num_machines),
            "--machine_rank",
            str(self.machine_rank),
            "--main_process_ip",
            self.main_process_ip,
            "--main_process_port",
            str(self.main_process_port),
            # Total processes: accelerate starts num_processes / num_machines of them here.
            "--num_processes",
            str(self.num_processes),
            # Static rendezvous: the global ranks follow the machine ranks, machine 0 serves the store at ip:port.
            "--rdzv_backend",
            "static",
            # With a DeepSpeed config accelerate would otherwise run DeepSpeed's pdsh launcher, which logs into every
            # node itself; here each machine runs its own launcher (torchrun), as with DDP. Ignored by other engines.
            "--deepspeed_multinode_launcher",
            "standard",
            *self.accelerate_args,
            self.recipe,
            *self.recipe_args,
        ]


def slurm_defaults(environ: dict[str, str]) -> dict[str, object]:
    """The machine options a Slurm job step gives each task (one task per node), from its environment."""
    defaults: dict[str, object] = {}
    if "SLURM_NNODES" in environ:
        defaults["num_machines"] = int(environ["SLURM_NNODES"])
    if "SLURM_NODEID" in environ:
        defaults["machine_rank"] = int(environ["SLURM_NODEID"])
    if "SLURM_GPUS_ON_NODE" in environ:
        defaults["processes_per_machine"] = int(environ["SLURM_GPUS_ON_NODE"])
    if "SLURM_JOB_ID" in environ:
        # A port of its own per job, so that two jobs whose first nodes coincide do not collide; the same port again
        # when the job is requeued (same id), once the previous run has ended.
        defaults["main_process_port"] = DEFAULT_PORT + int(environ["SLURM_JOB_ID"]) % 1000
    if "SLURM_JOB_NODELIST" in environ:
        # Node 0 of the job (SLURM_NODEID 0) is the first host of its node list; scontrol expands the compressed list
        # (nid[001-004]) locally, without asking the controller.
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", environ["SLURM_JOB_NODELIST"]],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        defaults["main_process_ip"] = hosts[0]
    return defaults


def parse_args(argv: list[str], environ: dict[str, str]) -> tuple[MachineLaunch, bool]:
    """The launch `argv` describes, with the Slurm variables of `environ` as defaults; and whether to print only."""
    parser = argparse.ArgumentParser(
        prog="recipes/launch.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_machines", type=int, default=1, help="Machines in the job (Slurm: SLURM_NNODES).")
    parser.add_argument(
        "--machine_rank", type=int, default=0, help="This machine's rank, 0 on the main one (Slurm: SLURM_NODEID)."
    )
    parser.add_argument(
        "--main_process_ip",
        help="Host name or address of machine 0 (Slurm: the first host of SLURM_JOB_NODELIST; one machine: 127.0.0.1).",
    )
    parser.add_argument(
        "--main_process_port",
        type=int,
        default=DEFAULT_PORT,
        help=f"Its rendezvous port, free there (default {DEFAULT_PORT}; Slurm: {DEFAULT_PORT} + SLURM_JOB_ID %% 1000).",
    )
    parser.add_argument(
        "--processes_per_machine", type=int, help="Processes on each machine, one per GPU (Slurm: SLURM_GPUS_ON_NODE)."
    )
    parser.add_argument(
        "--config_file",
        default=str(DEFAULT_CONFIG_FILE),
        help="The accelerate config, i.e. the engine (default: accelerate_configs/zero3.yaml).",
    )
    parser.add_argument(
        "--accelerate_args",
        default="",
        help='Further `accelerate launch` options in one string, e.g. "--mixed_precision no" (a single flag with =: '
        "--accelerate_args=--cpu).",
    )
    parser.add_argument("--print", action="store_true", help="Print the command, run nothing.")
    parser.add_argument("recipe", help="The training script, e.g. recipes/pretrain.py.")
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER, help="Its arguments.")
    parser.set_defaults(**slurm_defaults(environ))
    args = parser.parse_args(argv)
    if args.processes_per_machine is None:
        parser.error("--processes_per_machine is required (the GPUs of each machine) outside a Slurm job with GPUs.")
    if args.main_process_ip is None:
        if args.num_machines > 1:
            parser.error("--main_process_ip is required with several machines: the address of machine 0.")
        args.main_process_ip = "127.0.0.1"
    try:
        launch = MachineLaunch(
            recipe=args.recipe,
            recipe_args=tuple(args.recipe_args),
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            main_process_ip=args.main_process_ip,
            main_process_port=args.main_process_port,
            processes_per_machine=args.processes_per_machine,
            config_file=args.config_file,
            accelerate_args=tuple(shlex.split(args.accelerate_args)),
        )
    except ValueError as error:
        parser.error(str(error))
    return launch, args.print


def main() -> None:
    launch, print_only = parse_args(sys.argv[1:], dict(os.environ))
    command = launch.command()
    # Printed in both modes: under Slurm each node's log starts with the command it ran.
    print(shlex.join(command), flush=True)
    if not print_only:
        os.execv(command[0], command)


if __name__ == "__main__":
    main()
