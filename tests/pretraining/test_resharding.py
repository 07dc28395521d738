"""Resuming a DeepSpeed ZeRO-3 checkpoint on another number of processes (pretraining/resharding.py): the partition
arithmetic, the consolidation of a checkpoint against DeepSpeed's own zero_to_fp32, clear errors, and 1 -> 2 and
2 -> 1 process resumes of AdEMAMix under `accelerate launch` on the CPU."""

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from apertus_hf.pretraining.resharding import (
    GatheredTensors,
    ReshardError,
    Zero3FullState,
    checkpoint_world_size,
    consolidate_zero3_checkpoint,
    zero3_partition,
    zero3_unpartition,
)
from tests.pretraining.conftest import REPO_ROOT

pytest.importorskip("deepspeed")

CONFIGS = REPO_ROOT / "accelerate_configs"
WORKER = Path(__file__).with_name("reshard_worker.py")


def _even_split(full: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """ZeRO-3's partitions as zero_to_fp32 reads them: the flat tensor zero-padded to a multiple of the world size
    and cut into equal pieces."""
    flat = full.reshape(-1)
    per_rank = -(-flat.numel() // world_size)
    return list(torch.cat([flat, flat.new_zeros(per_rank * world_size - flat.numel())]).split(per_rank))


def test_zero3_partitions_split_a_parameter_evenly_with_the_padding_at_the_end_on_any_world_size():
    from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

    # 5 elements on 4 processes: 2 each, the third holds the last element and one of padding, the fourth only padding.
    five = torch.arange(1.0, 6.0)
    assert [zero3_partition(five, rank, 4).tolist() for rank in range(4)] == [[1, 2], [3, 4], [5, 0], [0, 0]]
    for numel in (1, 2, 3, 5, 7, 97, 100):
        full = torch.randn(numel)
        for world_size in (1, 2, 3, 4):
            partitions = [zero3_partition(full, rank, world_size) for rank in range(world_size)]
            partition_numel, padding = zero3_partitioned_param_info(numel, world_size)
            assert [p.numel() for p in partitions] == [partition_numel] * world_size, (numel, world_size)
            assert torch.equal(torch.cat(partitions)[numel:], torch.zeros(padding))
            assert all(
                torch.equal(ours, split) for ours, split in zip(partitions, _even_split(full, world_size), strict=True)
            )
            assert torch.equal(zero3_unpartition(partitions, full.shape), full)
    # A process of another world size reads its partition straight from the saved ones that overlap it.
    for numel in (1, 5, 7, 97):
        full = torch.randn(numel)
        for saved_world_size in (1, 2, 3, 4):
            gathered = GatheredTensors()
            gathered.add("weight", _even_split(full, saved_world_size), full.shape)
            for world_size in (1, 2, 3, 4):
                for rank in range(world_size):
                    expected = zero3_partition(full, rank, world_size)
                    assert torch.equal(gathered.partition("weight", rank, world_size), expected)
    matrix = torch.randn(7, 3)
    assert torch.equal(zero3_unpartition([zero3_partition(matrix, r, 4) for r in range(4)], matrix.shape), matrix)
    with pytest.raises(ValueError, match="fewer than the 21"):
        zero3_unpartition([zero3_partition(matrix, r, 4) for r in range(3)], matrix.shape)


# A checkpoint as 3 processes write it: two parameter groups, the first in two flat groups (sub-groups), odd sizes.
PARAMETERS = {"embed": (7, 5), "proj": (4, 3), "norm": (5,), "alpha": (1,)}
SUB_GROUPS = [["embed"], ["proj"], ["norm", "alpha"]]
GROUP_OF_SUB_GROUP = [0, 0, 1]
STATE_KEYS = ("exp_avg", "exp_avg_slow", "exp_avg_sq")


def _write_checkpoint(folder: Path, world_size: int, zero_stage: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    """Write the per-process files of a ZeRO-3 checkpoint of PARAMETERS into `folder/pytorch_model` (as
    `accelerator.save_state` names it); returns its full tensors by key ("fp32" and STATE_KEYS) and name."""
    generator = torch.Generator().manual_seed(0)
    full = {
        key: {name: torch.randn(shape, generator=generator) for name, shape in PARAMETERS.items()}
        for key in ("fp32", *STATE_KEYS)
    }
    ds_dir = folder / "pytorch_model"
    ds_dir.mkdir(parents=True)
    param_shapes = [OrderedDict((name, torch.Size(PARAMETERS[name])) for name in names) for names in SUB_GROUPS]
    for rank in range(world_size):

        def flat(key: str, names: list[str], rank: int = rank) -> torch.Tensor:
            return torch.cat([_even_split(full[key][name], world_size)[rank] for name in names])

        model_states = {
            "module": OrderedDict(**{name: torch.empty(0) for name in PARAMETERS}, rope_base=torch.tensor([2.0])),
            "buffer_names": ["rope_base"],
            "param_shapes": param_shapes,
            "frozen_param_shapes": OrderedDict(),
            "shared_params": {},
            "frozen_param_fragments": OrderedDict(),
            "lr_scheduler": None,
            "skipped_steps": 0,
            "global_steps": 7,
            "global_samples": 56,
            "dp_world_size": world_size,
            "mp_world_size": 1,
            "ds_version": "0.19.8",
        }
        torch.save(model_states, ds_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        base_state = {
            "state": {
                index: {"step": torch.tensor(7.0), **{key: flat(key, names) for key in STATE_KEYS}}
                for index, names in enumerate(SUB_GROUPS)
            },
            "param_groups": [
                {"lr": 0.01, "weight_decay": 0.1, "params": [0, 1]},
                {"lr": 0.01, "weight_decay": 0.0, "params": [2]},
            ],
        }
        optimizer_states = {
            "optimizer_state_dict": {
                "zero_stage": zero_stage,
                "loss_scaler": {"cur_scale": 1.0},
                "dynamic_loss_scale": False,
                "overflow": False,
                "partition_count": world_size,
                "optimizer_state_dict": base_state,
                "fp32_flat_groups": [flat("fp32", names) for names in SUB_GROUPS],
            },
            "ds_version": "0.19.8",
        }
        torch.save(optimizer_states, ds_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return full


def test_a_three_process_checkpoint_consolidates_to_its_full_tensors_as_zero_to_fp32_reads_them(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = _write_checkpoint(tmp_path, world_size=3)
    state = consolidate_zero3_checkpoint(tmp_path)
    assert state.world_size == checkpoint_world_size(tmp_path) == 3
    assert list(state.fp32_params) == list(PARAMETERS)
    # DeepSpeed's own reader of the fp32 weights agrees, element for element.
    reference = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag="pytorch_model")
    for name in PARAMETERS:
        assert torch.equal(state.fp32_params[name], full["fp32"][name]), name
        assert torch.equal(state.fp32_params[name], reference[name]), name
    # Every state key the optimizer had, whatever its name, as full tensors; the unpartitioned step as it was.
    assert sorted(state.optimizer_state) == sorted(STATE_KEYS)
    for key in STATE_KEYS:
        for name in PARAMETERS:
            assert torch.equal(state.optimizer_state[key][name], full[key][name]), (key, name)
    assert list(state.optimizer_scalars) == ["step"]
    assert all(torch.equal(step, torch.tensor(7.0)) for step in state.optimizer_scalars["step"].values())
    assert state.param_groups == [{"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.01, "weight_decay": 0.0}]
    assert state.param_group_of == {"embed": 0, "proj": 0, "norm": 1, "alpha": 1}
    assert state.buffers.keys() == {"rope_base"} and torch.equal(state.buffers["rope_base"], torch.tensor([2.0]))
    assert (state.global_steps, state.global_samples, state.skipped_steps) == (7, 56, 0)


def test_unusable_checkpoints_are_refused_with_what_is_missing_and_the_fix(tmp_path):
    _write_checkpoint(tmp_path / "lost_rank", world_size=3)
    (tmp_path / "lost_rank" / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ReshardError, match=r"written by 3 processes but lacks .* of rank\(s\) \[1\].*Restore them"):
        consolidate_zero3_checkpoint(tmp_path / "lost_rank")

    _write_checkpoint(tmp_path / "stage2", world_size=2, zero_stage=2)
    with pytest.raises(ReshardError, match="is a ZeRO stage 2 checkpoint; only ZeRO-3 checkpoints"):
        consolidate_zero3_checkpoint(tmp_path / "stage2")

    zero2 = tmp_path / "zero2" / "pytorch_model"
    zero2.mkdir(parents=True)
    torch.save({}, zero2 / "mp_rank_00_model_states.pt")
    with pytest.raises(ReshardError, match=r"is a DeepSpeed ZeRO-1/2 checkpoint .* Resume it on as many processes"):
        consolidate_zero3_checkpoint(tmp_path / "zero2")

    # A DDP checkpoint holds no shards: it is not resharded, but its world size is known from its random states.
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    for rank in range(2):
        torch.save({"step": 0}, ddp / f"random_states_{rank}.pkl")
    with pytest.raises(ReshardError, match=r"holds no DeepSpeed ZeRO-3 checkpoint.* loads on any number of processes"):
        consolidate_zero3_checkpoint(ddp)
    assert checkpoint_world_size(ddp) == 2
    with pytest.raises(ReshardError, match=r"not a checkpoint written by accelerator\.save_state"):
        checkpoint_world_size(tmp_path / "zero2" / "pytorch_model")


def _launch(processes: int, config: str, arguments: list[str]) -> None:
    """`accelerate launch --config_file accelerate_configs/<config>` of the worker on `processes` CPU processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    command += ["--num_processes", str(processes), "--mixed_precision", "no", str(WORKER), *arguments]
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    completed = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]


def _assert_same_state(saved: Zero3FullState, reloaded: Zero3FullState) -> None:
    """Every parameter, optimizer state tensor and scalar, hyperparameter and counter equal, bit for bit."""
    assert list(reloaded.fp32_params) == list(saved.fp32_params)
    for name in saved.fp32_params:
        assert torch.equal(reloaded.fp32_params[name], saved.fp32_params[name]), name
    assert (
        sorted(reloaded.optimizer_state) == sorted(saved.optimizer_state) == ["exp_avg", "exp_avg_slow", "exp_avg_sq"]
    )
    for key, tensors in saved.optimizer_state.items():
        for name in saved.fp32_params:
            assert torch.equal(reloaded.optimizer_state[key][name], tensors[name]), (key, name)
    assert reloaded.optimizer_scalars == saved.optimizer_scalars
    assert reloaded.param_groups == saved.param_groups
    assert reloaded.param_group_of == saved.param_group_of
    assert reloaded.buffers.keys() == saved.buffers.keys()
    assert all(torch.equal(reloaded.buffers[name], value) for name, value in saved.buffers.items())
    assert (reloaded.global_steps, reloaded.global_samples) == (saved.global_steps, saved.global_samples)


@pytest.mark.slow
def test_zero3_ademamix_state_resumes_resharded_from_one_to_two_processes_and_back(tmp_path):
    """1 process trains 3 steps and saves; 2 processes load it resharded, save at once, then train 2 more steps and
    save; 1 process (with the offload config) loads that. A save right after a resharded load holds exactly the
    state that was loaded, and the step taken after it equals the one the saving run took from the same state."""
    _launch(
        1,
        "zero3.yaml",
        ["--train_steps", "3", "--checkpoint", f"{tmp_path}/a1", "--step_after_checkpoint", f"{tmp_path}/r1.pt"],
    )
    _launch(
        2,
        "zero3.yaml",
        [
            *("--resume_from", f"{tmp_path}/a1", "--loaded_save", f"{tmp_path}/b2"),
            *("--step_after_load", f"{tmp_path}/p2.pt", "--train_steps", "2"),
            *("--checkpoint", f"{tmp_path}/a2", "--step_after_checkpoint", f"{tmp_path}/r2.pt"),
        ],
    )
    _launch(
        1,
        "zero3_offload.yaml",
        [
            "--resume_from",
            f"{tmp_path}/a2",
            "--loaded_save",
            f"{tmp_path}/b1",
            "--step_after_load",
            f"{tmp_path}/p1.pt",
        ],
    )
    offload = torch.load(
        tmp_path / "b1" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False
    )
    assert offload["ds_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"

    for saved, reloaded, steps, reference, resumed in (("a1", "b2", 3, "r1", "p2"), ("a2", "b1", 6, "r2", "p1")):
        before = consolidate_zero3_checkpoint(tmp_path / saved)
        after = consolidate_zero3_checkpoint(tmp_path / reloaded)
        assert (checkpoint_world_size(tmp_path / saved), checkpoint_world_size(tmp_path / reloaded)) in ((1, 2), (2, 1))
        assert before.optimizer_scalars["step"] == dict.fromkeys(before.fp32_params, steps)
        # Every moment of every parameter has moved off zero (the check below would be void otherwise).
        for key, tensors in before.optimizer_state.items():
            assert all(tensors[name].abs().max() > 0 for name in before.fp32_params), key
        _assert_same_state(before, after)
        # The registered object came back too.
        assert torch.load(tmp_path / reloaded / "custom_checkpoint_0.pkl", weights_only=False) == {"value": steps}

        # The next step on the same global batch: within float rounding of the saving run's step from the same state
        # (another number of processes sums the rows in another order; 1.5e-8 measured), while that step moved every
        # parameter by more than 1e-3.
        expected = torch.load(tmp_path / f"{reference}.pt")
        actual = torch.load(tmp_path / f"{resumed}.pt")
        assert sorted(actual) == sorted(before.fp32_params)
        difference = max((actual[name] - expected[name]).abs().max().item() for name in expected)
        moved = min((expected[name] - before.fp32_params[name]).abs().max().item() for name in expected)
        assert difference < 1e-6, difference
        assert moved > 1e-3, moved
