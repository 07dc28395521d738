"""Multi-machine launch: recipes/launch.py (the one generator of each machine's `accelerate launch` command) and the
Slurm script around it.

Two "machines" on 127.0.0.1, each an `accelerate launch --num_machines 2 --machine_rank r` of one CPU process (gloo),
train as one machine does: with ZeRO-3 bit for bit as two processes on one machine, also across a SIGTERM stop and a
relaunch; with DDP as one process with the same global batch, within float rounding. Slurm
is not installed here: the Slurm script runs under bash with stand-ins for srun, scontrol and scancel (first on PATH,
also where Slurm is installed) that record their calls, which tests its command lines and its requeue logic, not
Slurm itself.
"""

import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from apertus_hf.pretraining import PretrainConfig, complete_checkpoints, pretrain, read_metrics
from apertus_hf.pretraining.trainer import StopRequest
from tests.pretraining.conftest import REPO_ROOT, run_recipe, tiny_run, write_recipe

LAUNCH = REPO_ROOT / "recipes" / "launch.py"
SBATCH = REPO_ROOT / "accelerate_configs" / "slurm" / "launch.sbatch"
CONFIGS = REPO_ROOT / "accelerate_configs"


# ---------------------------------------------------------------------------------------------------------------------
# The generator and the Slurm script, without Slurm
# ---------------------------------------------------------------------------------------------------------------------

# Stand-ins for Slurm's commands: each appends its call to $CALLS. srun runs its command once per node with that
# node's SLURM_NODEID, as `srun --ntasks-per-node=1` does; in the stop test it waits instead, until scancel signals it.
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$CALLS"
while [[ $1 == --* ]]; do shift; done
if [[ -n ${SRUN_WAITS:-} ]]; then
    sleep 60 &
    echo $! > "$SRUN_CHILD"
    wait $!
    echo "srun ended $?" >> "$CALLS"
    exit 1
fi
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" || exit $?
done
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$CALLS"
if [[ $1 == show && $2 == hostnames ]]; then printf 'nid00%d\\n' 1 2 3 4; fi
"""
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$CALLS"
kill -TERM "$(cat "$SRUN_CHILD")"
"""


def _slurm_job(tmp_path: Path, **environment: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of launch.sbatch as a 4-node job (id 4242, 4 GPUs per node) would run it, with the
    stand-ins first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(tmp_path / "calls.txt"),
        "SRUN_CHILD": str(tmp_path / "srun_child.pid"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "apertus",
        "SLURM_NNODES": "4",
        "SLURM_JOB_NODELIST": "nid[001-004]",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_ON_NODE": "288",
        "PYTHON": sys.executable,
        "LOG_DIR": str(tmp_path / "logs"),
        **environment,
    }
    command = ["bash", str(SBATCH), "recipes/pretrain.py", "--config", "recipes/configs/8b/pretrain.yaml"]
    return command, env


def _sbatch_options() -> dict[str, str]:
    options = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line.removeprefix("#SBATCH ").partition("=")
            options[name] = value
    return options


def test_the_slurm_script_starts_one_launch_per_node_with_its_rank_the_first_host_and_the_total_processes(tmp_path):
    command, env = _slurm_job(tmp_path, DRY_RUN="1", LAUNCHES="2", ACCELERATE_ARGS="--mixed_precision bf16")
    job = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    printed = [shlex.split(line) for line in job.stdout.splitlines() if "accelerate.commands.launch" in line]
    # LAUNCHES=2: two srun steps of 4 nodes each.
    assert len(printed) == 8
    port = "29742"  # 29500 + job id % 1000
    for node, line in enumerate(printed[:4]):
        assert line == [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "accelerate_configs/zero3.yaml",
            "--num_machines",
            "4",
            "--machine_rank",
            str(node),
            "--main_process_ip",
            "nid001",
            "--main_process_port",
            port,
            "--num_processes",
            "16",
            "--rdzv_backend",
            "static",
            "--deepspeed_multinode_launcher",
            "standard",
            "--mixed_precision",
            "bf16",
            "recipes/pretrain.py",
            "--config",
            "recipes/configs/8b/pretrain.yaml",
        ]
    assert printed[4:] == printed[:4]
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    srun_calls = [call for call in calls if call.startswith("srun ")]
    assert len(srun_calls) == 2
    assert srun_calls[0].startswith(
        "srun --ntasks-per-node=1 --cpus-per-task=288 --kill-on-bad-exit=1 --open-mode=append "
        f"--output={tmp_path}/logs/node-%n.out "
        f"{sys.executable} recipes/launch.py --config_file accelerate_configs/zero3.yaml"
    )
    assert not any("requeue" in call or call.startswith("scancel") for call in calls)

    # Preemption and the time limit: SIGTERM to the batch script 900 s before the end, a requeueable job whose logs
    # append, and torchrun's agents waiting for the checkpoint (840 s) before they kill their workers.
    options = _sbatch_options()
    assert options["--signal"] == "B:TERM@900"
    assert options["--requeue"] == "" and options["--open-mode"] == "append"
    assert (options["--ntasks-per-node"], options["--nodes"]) == ("1", "2")
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-840}" in SBATCH.read_text()


def test_sigterm_to_the_slurm_script_stops_the_training_then_requeues_the_job(tmp_path):
    command, env = _slurm_job(tmp_path, SRUN_WAITS="1", OUTPUT_DIR="/shared/run")
    job = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun_child.pid").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    output = job.communicate(timeout=30)[0]
    assert "SIGTERM: every process of the training saves a checkpoint" in output
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    # The signal goes to the job steps (not to srun, which would kill its tasks), the script waits for the step to
    # end, then requeues the job; OUTPUT_DIR reaches the recipe.
    assert calls[0].endswith("recipes/pretrain.py --config recipes/configs/8b/pretrain.yaml --output_dir /shared/run")
    assert calls[1:] == ["scancel --signal=TERM 4242", "srun ended 143", "scontrol requeue 4242"]


def test_each_machine_command_gives_accelerate_the_torchrun_settings_of_its_node(monkeypatch, capsys):
    """What accelerate makes of the generated command of node 2 of 4 (4 GPUs each), as `accelerate launch` does."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env

    spec = importlib.util.spec_from_file_location("recipe_launch", LAUNCH)
    launch = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, launch)  # its dataclass looks itself up there
    spec.loader.exec_module(launch)

    environ = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "4"}
    machine, print_only = launch.parse_args(
        ["--main_process_ip", "nid001", "--main_process_port", "29742", "recipes/sft.py", "--config", "c.yaml"], environ
    )
    assert not print_only and machine.num_processes == 16
    command = machine.command()
    arguments, _, _ = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
    arguments.deepspeed_fields_from_accelerate_config = ""
    deepspeed_command, environment = prepare_deepspeed_cmd_env(arguments)
    # torchrun on this machine (no DeepSpeed runner command), its 4 processes of 16, rendezvous at node 0.
    assert deepspeed_command is None
    assert (arguments.nnodes, arguments.node_rank, arguments.nproc_per_node) == ("4", 2, "4")
    assert (arguments.rdzv_backend, arguments.rdzv_endpoint) == ("static", "nid001:29742")
    assert environment["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert (arguments.training_script, arguments.training_script_args) == ("recipes/sft.py", ["--config", "c.yaml"])

    # Bad input names the problem and the fix.
    with pytest.raises(SystemExit):
        launch.parse_args(["--num_machines", "2", "--processes_per_machine", "1", "recipes/sft.py"], {})
    assert "--main_process_ip is required with several machines: the address of machine 0." in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"machine_rank=4 is not one of the 4 machines' ranks 0..3"):
        launch.MachineLaunch("r.py", (), 4, 4, "nid001", 29500, 4)


def test_a_worker_takes_the_sigterm_of_slurm_and_the_one_torchrun_passes_on_as_one_stop_request(caplog):
    """Slurm signals every process of a job step, and torchrun's agent passes its own SIGTERM on to its workers: the
    second must not end the worker before it saves (it did while the first restored the default handler)."""
    interrupt_handler = signal.getsignal(signal.SIGINT)
    with caplog.at_level("WARNING", logger="apertus_hf.pretraining"), StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        assert caplog.text.count("Received SIGTERM: saving a checkpoint after this step") == 1
        # Ctrl-C twice still ends a run: the first SIGINT gives the previous handler back.
        os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is interrupt_handler


# ---------------------------------------------------------------------------------------------------------------------
# Two machines on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(recipe: Path, config_file: str, num_machines: int) -> list[subprocess.Popen]:
    """Each machine of a job of 2 CPU processes on 127.0.0.1, started through recipes/launch.py."""
    port = str(_free_port())
    machines = []
    for rank in range(num_machines):
        launcher = [
            sys.executable,
            str(LAUNCH),
            *("--num_machines", str(num_machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"),
            *("--main_process_port", port, "--processes_per_machine", str(2 // num_machines)),
            *("--config_file", str(CONFIGS / config_file), "--accelerate_args", "--mixed_precision no"),
        ]
        machines.append(run_recipe(["--config", str(recipe)], launcher=launcher))
    return machines


def _finish(machines: list[subprocess.Popen], succeed: bool = True) -> list[str]:
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    if succeed:
        for machine, output in zip(machines, outputs, strict=True):
            assert machine.returncode == 0, output[-4000:]
    return outputs


@pytest.mark.slow
def test_two_machines_with_ddp_train_as_one_process_does(tmp_path, small_corpus, monkeypatch):
    """The shipped ddp.yaml on two one-process machines: the losses and gradient norms of one process with the same
    global batch (as test_distributed.py checks for two processes on one machine)."""
    options = {"max_steps": 8, "checkpoint_steps": 0, "eval_steps": 0}
    single = pretrain(PretrainConfig(**tiny_run(tmp_path / "one", small_corpus, per_device_batch_size=4, **options)))
    AcceleratorState._reset_state(True)

    output_dir = tmp_path / "two"
    recipe = write_recipe(tmp_path / "two.json", tiny_run(output_dir, small_corpus, per_device_batch_size=2, **options))
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)  # ddp.yaml as it is (test_distributed.py)
    _finish(_start(recipe, "ddp.yaml", num_machines=2))
    assert "on 2 process(es), distributed type MULTI_CPU" in (output_dir / "train.log").read_text()
    records = read_metrics(output_dir / "metrics.jsonl")
    expected = read_metrics(single.output_dir / "metrics.jsonl")
    assert [record["step"] for record in records] == list(range(1, 9))
    for record, single_record in zip(records, expected, strict=True):
        assert record["train/loss"] == pytest.approx(single_record["train/loss"], rel=1e-5), record["step"]
        assert record["train/grad_norm"] == pytest.approx(single_record["train/grad_norm"], rel=1e-5), record["step"]


@pytest.mark.slow
def test_two_machines_with_zero3_train_as_one_machine_and_resume_after_sigterm_to_every_process(tmp_path, small_corpus):
    """The shipped zero3.yaml: the job on two one-process machines trains bit for bit as on one machine with two
    processes. SIGTERM to every process of both machines, launchers and workers alike (as Slurm signals a job step at
    preemption or from the Slurm script's trap): each rank saves its shard at the step the job stops at, and the job
    relaunched on both machines resumes from there to the same records and exported weights."""
    pytest.importorskip("deepspeed")
    options = {"per_device_batch_size": 2, "max_steps": 16, "checkpoint_steps": 4, "eval_steps": 0}
    reference = write_recipe(tmp_path / "one.json", tiny_run(tmp_path / "one", small_corpus, **options))
    _finish(_start(reference, "zero3.yaml", num_machines=1))

    output_dir = tmp_path / "two"
    recipe = write_recipe(tmp_path / "two.json", tiny_run(output_dir, small_corpus, **options))
    machines = _start(recipe, "zero3.yaml", num_machines=2)
    deadline = time.monotonic() + 300
    while not (output_dir / "checkpoints" / "step_00000004").is_dir():
        assert time.monotonic() < deadline and all(machine.poll() is None for machine in machines)
        time.sleep(0.02)
    launchers = [psutil.Process(machine.pid) for machine in machines]
    for process in [*launchers, *(child for launcher in launchers for child in launcher.children(recursive=True))]:
        process.send_signal(signal.SIGTERM)
    outputs = _finish(machines, succeed=False)
    log = (output_dir / "train.log").read_text()
    assert "on 2 process(es), distributed type DEEPSPEED" in log
    assert "Received SIGTERM: saving a checkpoint after this step, then stopping." in log, outputs[0][-4000:]
    stopped_at = complete_checkpoints(output_dir / "checkpoints")[0]
    step = int(stopped_at.name.removeprefix("step_"))
    assert 4 < step < 16 and f"Stopped at step {step} of 16" in log
    assert len(list(stopped_at.rglob("*optim_states.pt"))) == 2  # one shard per rank, one rank per machine
    assert [record["step"] for record in read_metrics(output_dir / "metrics.jsonl")] == list(range(1, step + 1))

    _finish(_start(recipe, "zero3.yaml", num_machines=2))
    assert f"Resumed from {stopped_at} at step {step}" in (output_dir / "train.log").read_text()
    # Bit for bit: every step's loss, gradient norm and learning rate, the final held-out loss, the exported weights.
    keys = ("step", "train/loss", "train/grad_norm", "train/lr", "eval/loss")
    records = [{key: record.get(key) for key in keys} for record in read_metrics(output_dir / "metrics.jsonl")]
    expected = [{key: record.get(key) for key in keys} for record in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    assert records == expected
    weights = load_file(output_dir / "model" / "model.safetensors")
    expected_weights = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        assert tensor.equal(expected_weights[name]), name
