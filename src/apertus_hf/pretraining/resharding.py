"""Resume a DeepSpeed ZeRO-3 checkpoint on another number of processes, with the model and the full optimizer state.

A ZeRO-3 checkpoint is one file of optimizer state per process: each holds, for every parameter, that process's
partition of the fp32 master weight and of every optimizer state tensor. DeepSpeed only loads such a checkpoint on
as many processes as wrote it. Its way across world sizes, the universal checkpoint (`ds_to_universal.py` and
stage3's `load_hp_checkpoint_state_from_checkpoint_dir_stage3`), restores only the state keys "exp_avg" and
"exp_avg_sq" and gives every parameter group the hyperparameters of the first: AdEMAMix would lose its slow EMA
(`exp_avg_slow`) and the norms would get weight decay. So we reshard ourselves, with DeepSpeed's own layout rules:

- the flat groups (`deepspeed/utils/zero_to_fp32.py`): a process holds one flat tensor per sub-group (a run of
  parameters of one parameter group); in it each parameter takes `ceil(numel / world_size)` elements, its slice
  of the parameter flattened and zero-padded at the end (`zero3_partitioned_param_info`);
- the optimizer state of a sub-group has the layout of its flat fp32 tensor, element for element;
- the loading (stage3's `_rigid_load_state_dict`, run by its `load_state_dict`): the fp32 master partitions, the
  base optimizer's state dict, then the low-precision partitions copied from the fp32 ones.

`consolidate_zero3_checkpoint` reads a checkpoint of any world size into full tensors by parameter name, whatever
the optimizer's state keys are; `load_resharded_zero3_state` gives a live engine, on the current processes, its
own partition of each. `load_resharded_state` does what `accelerator.load_state` does, with the engine resharded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils.constants import MODEL_NAME

logger = logging.getLogger(__name__)

_MODEL_STATES = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_OPTIMIZER_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_RANDOM_STATES = re.compile(r"^random_states_(\d+)\.pkl$")


class ReshardError(ValueError):
    """A checkpoint that cannot be resharded, or an engine it cannot be loaded into; the message says why and what
    to do."""


def zero3_partition(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The partition of `full` that process `rank` of `world_size` holds under ZeRO-3: elements
    `[rank * p, (rank + 1) * p)` of `full` flattened and zero-padded to `world_size * p`, with p =
    ceil(numel / world_size). A view of `full` when it needs no padding."""
    from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    partition_numel, padding = zero3_partitioned_param_info(full.numel(), world_size)
    flat = full.reshape(-1)
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return flat.narrow(0, rank * partition_numel, partition_numel)


def zero3_unpartition(partitions: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The full tensor of `shape` from its ZeRO-3 partitions, one per process in rank order (padding dropped)."""
    numel = shape.numel()
    held = sum(partition.numel() for partition in partitions)
    if held < numel:
        raise ValueError(f"{len(partitions)} partitions hold {held} elements, fewer than the {numel} of {shape}")
    return torch.cat(partitions).narrow(0, 0, numel).view(shape)


class GatheredTensors(Mapping[str, torch.Tensor]):
    """Full tensors by parameter name, each gathered from its per-process partitions when read: the checkpoint's
    files are memory-mapped, so only the parameter being read is held in memory in full. `partition` reads only the
    part of the files that one process of another world size needs."""

    def __init__(self) -> None:
        self._partitions: dict[str, tuple[list[torch.Tensor], torch.Size]] = {}

    def add(self, name: str, partitions: list[torch.Tensor], shape: torch.Size) -> None:
        self._partitions[name] = (partitions, torch.Size(shape))

    def shape(self, name: str) -> torch.Size:
        return self._partitions[name][1]

    def __getitem__(self, name: str) -> torch.Tensor:
        partitions, shape = self._partitions[name]
        return zero3_unpartition(partitions, shape)

    def partition(self, name: str, rank: int, world_size: int) -> torch.Tensor:
        """`zero3_partition(self[name], rank, world_size)`, read from the saved partitions that overlap it only."""
        from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

        saved, shape = self._partitions[name]
        numel, saved_numel = shape.numel(), saved[0].numel()
        partition_numel, _ = zero3_partitioned_param_info(numel, world_size)
        start = rank * partition_numel
        end = min(start + partition_numel, numel)
        pieces = []
        while start < end:
            offset = start % saved_numel
            taken = min(saved_numel - offset, end - start)
            pieces.append(saved[start // saved_numel].narrow(0, offset, taken))
            start += taken
        padding = partition_numel - sum(piece.numel() for piece in pieces)
        return torch.cat([*pieces, saved[0].new_zeros(padding)])

    def __iter__(self) -> Iterator[str]:
        return iter(self._partitions)

    def __len__(self) -> int:
        return len(self._partitions)


@dataclass
class Zero3FullState:
    """The state of a ZeRO-3 engine as full tensors by parameter name, independent of the world size."""

    world_size: int
    """Processes that wrote the checkpoint."""
    fp32_params: GatheredTensors
    """The fp32 master weight of every trained parameter."""
    optimizer_state: dict[str, GatheredTensors]
    """Every partitioned optimizer state, by state key (AdEMAMix: exp_avg, exp_avg_slow, exp_avg_sq)."""
    optimizer_scalars: dict[str, dict[str, Any]]
    """The optimizer's per-parameter values that are not partitioned (AdEMAMix: its step count), by state key."""
    param_groups: list[dict[str, Any]]
    """The hyperparameters of each parameter group of the base optimizer (lr, betas, weight_decay, ...)."""
    param_group_of: dict[str, int]
    """The index of each parameter's group."""
    buffers: dict[str, torch.Tensor]
    loss_scaler: Any
    dynamic_loss_scale: bool
    overflow: bool
    global_steps: int
    global_samples: int
    skipped_steps: int
    lr_scheduler: dict[str, Any] | None
    """The state of DeepSpeed's own scheduler (None when the engine had none, as under accelerate)."""


def deepspeed_checkpoint_dir(folder: str | Path) -> Path:
    """The folder of a checkpoint's DeepSpeed files: `folder/pytorch_model` for a folder that
    `accelerator.save_state` wrote (it calls `engine.save_checkpoint(folder, tag=MODEL_NAME)`), or `folder` itself
    when it holds them."""
    folder = Path(folder)
    for candidate in (folder / MODEL_NAME, folder):
        if not candidate.is_dir():
            continue
        if any(_MODEL_STATES.match(path.name) for path in candidate.iterdir()):
            return candidate
        if (candidate / "mp_rank_00_model_states.pt").is_file():
            raise ReshardError(
                f"{candidate} is a DeepSpeed ZeRO-1/2 checkpoint (mp_rank_00_model_states.pt); only ZeRO-3 "
                "checkpoints (accelerate_configs/zero3.yaml) are resharded here. Resume it on as many processes as "
                "wrote it."
            )
    raise ReshardError(
        f"{folder} holds no DeepSpeed ZeRO-3 checkpoint: neither it nor {folder / MODEL_NAME} has "
        "zero_pp_rank_<r>_mp_rank_00_model_states.pt files. A checkpoint written without DeepSpeed (DDP, a single "
        "process) holds the full model and optimizer and loads on any number of processes with "
        "accelerator.load_state."
    )


def checkpoint_world_size(folder: str | Path) -> int:
    """The number of processes that wrote the checkpoint `folder` (one `accelerator.save_state` folder).

    For a DeepSpeed checkpoint this is its data-parallel world size, read from the first process's small model-states
    file; otherwise the number of per-process random-state files that accelerate wrote.
    """
    folder = Path(folder)
    try:
        ds_dir = deepspeed_checkpoint_dir(folder)
    except ReshardError:
        ranks = [int(match.group(1)) for path in folder.iterdir() if (match := _RANDOM_STATES.match(path.name))]
        if not ranks:
            raise ReshardError(
                f"{folder} is not a checkpoint written by accelerator.save_state: it has no random_states_<r>.pkl "
                "files, one of which every process writes."
            ) from None
        return max(ranks) + 1
    return _deepspeed_world_size(ds_dir)


def consolidate_zero3_checkpoint(folder: str | Path) -> Zero3FullState:
    """Read the ZeRO-3 checkpoint in `folder` (as `deepspeed_checkpoint_dir` finds it), written by any number of
    processes, into full tensors by parameter name: the fp32 master weights and every optimizer state key it holds.

    The per-process files are memory-mapped, not read into memory: a tensor of the result is gathered when read, and
    a process that loads the result reads only its own partitions (`GatheredTensors.partition`).
    """
    from deepspeed.checkpoint.constants import (
        BUFFER_NAMES,
        FP32_FLAT_GROUPS,
        FROZEN_PARAM_SHAPES,
        LOSS_SCALER,
        OPTIMIZER_STATE_DICT,
        PARAM_SHAPES,
        PARTITION_COUNT,
        ZERO_STAGE,
    )
    from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

    ds_dir = deepspeed_checkpoint_dir(folder)
    world_size = _deepspeed_world_size(ds_dir)
    model_states = [_load(path) for path in _rank_files(ds_dir, _MODEL_STATES, world_size)]
    optimizer_files = _rank_files(ds_dir, _OPTIMIZER_STATES, world_size)
    zero_states = [_load(path)[OPTIMIZER_STATE_DICT] for path in optimizer_files]
    stage = zero_states[0].get(ZERO_STAGE)
    if stage != 3:
        raise ReshardError(
            f"{ds_dir} is a ZeRO stage {stage} checkpoint; only ZeRO-3 checkpoints (accelerate_configs/zero3.yaml) "
            "are resharded here. Resume it on as many processes as wrote it, or convert it with DeepSpeed's "
            "ds_to_universal.py."
        )
    if zero_states[0][PARTITION_COUNT] != world_size:
        raise ReshardError(
            f"{ds_dir}: the optimizer states are partitioned over {zero_states[0][PARTITION_COUNT]} processes but "
            f"the model states say {world_size}; the folder mixes files of two checkpoints."
        )
    if model_states[0].get(FROZEN_PARAM_SHAPES):
        raise ReshardError(
            f"{ds_dir} has frozen parameters ({', '.join(model_states[0][FROZEN_PARAM_SHAPES])}), which are not "
            "resharded: pretraining trains every parameter."
        )

    sub_group_shapes = model_states[0][PARAM_SHAPES]
    base_states = [zero_state[OPTIMIZER_STATE_DICT] for zero_state in zero_states]
    flat_groups = [zero_state[FP32_FLAT_GROUPS] for zero_state in zero_states]
    param_groups = base_states[0]["param_groups"]
    # The base optimizer numbers its flat tensors group by group, the sub-groups of a group in order, so its k-th
    # tensor is sub-group k (stage3's `_set_fp32_optimizer_param_groups`).
    numbered = [index for group in param_groups for index in group["params"]]
    if numbered != list(range(len(sub_group_shapes))) or len(flat_groups[0]) != len(sub_group_shapes):
        raise ReshardError(
            f"{ds_dir}: the optimizer numbers its tensors {numbered} for {len(sub_group_shapes)} sub-groups of "
            f"parameters and {len(flat_groups[0])} flat groups; this DeepSpeed layout is not one we can reshard."
        )

    fp32_params = GatheredTensors()
    optimizer_state: dict[str, GatheredTensors] = {}
    optimizer_scalars: dict[str, dict[str, Any]] = {}
    param_group_of: dict[str, int] = {}
    for group_index, group in enumerate(param_groups):
        for sub_group in group["params"]:
            flat_numel = flat_groups[0][sub_group].numel()
            sub_group_state = base_states[0]["state"].get(sub_group, {})
            offset = 0
            for name, shape in sub_group_shapes[sub_group].items():
                partition_numel, _ = zero3_partitioned_param_info(torch.Size(shape).numel(), world_size)
                param_group_of[name] = group_index
                fp32_params.add(
                    name, [flats[sub_group].narrow(0, offset, partition_numel) for flats in flat_groups], shape
                )
                for key, value in sub_group_state.items():
                    if torch.is_tensor(value) and value.dim() == 1 and value.numel() == flat_numel:
                        partitions = [
                            states["state"][sub_group][key].narrow(0, offset, partition_numel) for states in base_states
                        ]
                        optimizer_state.setdefault(key, GatheredTensors()).add(name, partitions, shape)
                    else:
                        optimizer_scalars.setdefault(key, {})[name] = value
                offset += partition_numel
            if offset != flat_numel:
                raise ReshardError(
                    f"{ds_dir}: sub-group {sub_group} holds {flat_numel} elements per process but its parameters "
                    f"take {offset}; this DeepSpeed layout is not one we can reshard."
                )

    buffer_names = model_states[0][BUFFER_NAMES]
    model = model_states[0]
    return Zero3FullState(
        world_size=world_size,
        fp32_params=fp32_params,
        optimizer_state=optimizer_state,
        optimizer_scalars=optimizer_scalars,
        param_groups=[{key: value for key, value in group.items() if key != "params"} for group in param_groups],
        param_group_of=param_group_of,
        buffers={name: tensor for name, tensor in model["module"].items() if name in buffer_names},
        loss_scaler=zero_states[0][LOSS_SCALER],
        dynamic_loss_scale=zero_states[0]["dynamic_loss_scale"],
        overflow=zero_states[0]["overflow"],
        global_steps=model["global_steps"],
        global_samples=model["global_samples"],
        skipped_steps=model["skipped_steps"],
        lr_scheduler=model.get("lr_scheduler"),
    )


def load_resharded_zero3_state(engine: Any, state: Zero3FullState) -> None:
    """Load `state` (from `consolidate_zero3_checkpoint`) into `engine`, a DeepSpeedEngine under ZeRO-3 on any
    number of processes, as `engine.load_checkpoint` would load a checkpoint of its own world size: every process
    takes its partition of each parameter's fp32 master weight and optimizer state, the low-precision weights
    follow the fp32 ones, and the loss scaler, the optimizer's hyperparameters and step, DeepSpeed's step counters
    and the model's buffers are restored. Every process must call it (collectively, like `load_checkpoint`)."""
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, LOSS_SCALER, OPTIMIZER_STATE_DICT
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    optimizer = engine.optimizer
    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        raise ReshardError(
            f"The engine's optimizer is a {type(optimizer).__name__}, not DeepSpeed's ZeRO-3 optimizer: launch with "
            "accelerate_configs/zero3.yaml (or another ZeRO-3 config), and prepare the model and optimizer with "
            "accelerator.prepare before loading."
        )
    names = {param: name for name, param in engine.module.named_parameters()}
    live_names = {names[param] for sub_group in optimizer.fp16_groups for param in sub_group}
    if live_names != set(state.fp32_params):
        missing = sorted(live_names - set(state.fp32_params))
        unknown = sorted(set(state.fp32_params) - live_names)
        raise ReshardError(
            f"The checkpoint's parameters differ from the model's: the checkpoint lacks {missing[:5]} and has "
            f"{unknown[:5]} that the model does not train. Resume with the model configuration the run was saved "
            "with."
        )
    base = optimizer.optimizer
    if len(base.param_groups) != len(state.param_groups):
        raise ReshardError(
            f"The checkpoint's optimizer has {len(state.param_groups)} parameter groups, the live one "
            f"{len(base.param_groups)}; resume with the optimizer settings the run was saved with."
        )

    fp32_flats: list[torch.Tensor] = []
    sub_group_states: list[dict[str, Any]] = []
    for sub_group_id, params in enumerate(optimizer.fp16_groups):
        group_id = optimizer.sub_group_to_group_id[sub_group_id]
        fp32_pieces: list[torch.Tensor] = []
        state_pieces: dict[str, list[torch.Tensor]] = {key: [] for key in state.optimizer_state}
        scalars: dict[str, Any] = {}
        for param in params:
            name = names[param]
            if state.param_group_of[name] != group_id:
                raise ReshardError(
                    f"{name} is in parameter group {state.param_group_of[name]} in the checkpoint but in group "
                    f"{group_id} here; resume with the optimizer settings the run was saved with."
                )
            rank = dist.get_rank(group=param.ds_process_group)
            world_size = dist.get_world_size(group=param.ds_process_group)
            shape = state.fp32_params.shape(name)
            if shape != param.ds_shape:
                raise ReshardError(f"{name} has shape {tuple(shape)} in the checkpoint, {tuple(param.ds_shape)} here")
            fp32_pieces.append(state.fp32_params.partition(name, rank, world_size))
            for key, tensors in state.optimizer_state.items():
                state_pieces[key].append(tensors.partition(name, rank, world_size))
            for key, values in state.optimizer_scalars.items():
                if key in scalars and not _same(scalars[key], values[name]):
                    raise ReshardError(
                        f"The checkpoint's optimizer state {key!r} differs between parameters that now share a "
                        f"flat group ({scalars[key]} and {values[name]} for {name}); they cannot be resharded."
                    )
                scalars.setdefault(key, values[name])
        fp32_flats.append(torch.cat(fp32_pieces))
        sub_group_states.append({**scalars, **{key: torch.cat(pieces) for key, pieces in state_pieces.items()}})

    # The base optimizer's state dict as stage3 saves it: its k-th tensor is the k-th sub-group, numbered group by
    # group; torch's load_state_dict restores each group's hyperparameters with it.
    base_state: dict[str, Any] = {"state": {}, "param_groups": []}
    for group_id, hyperparameters in enumerate(state.param_groups):
        indices = [
            sub_group_id
            for sub_group_id in range(len(optimizer.fp16_groups))
            if optimizer.sub_group_to_group_id[sub_group_id] == group_id
        ]
        for sub_group_id in indices:
            if sub_group_states[sub_group_id]:
                base_state["state"][sub_group_id] = sub_group_states[sub_group_id]
        base_state["param_groups"].append({**hyperparameters, "params": indices})
    rigid_state = {
        LOSS_SCALER: state.loss_scaler,
        "dynamic_loss_scale": state.dynamic_loss_scale,
        "overflow": state.overflow,
        OPTIMIZER_STATE_DICT: base_state,
        FP32_FLAT_GROUPS: fp32_flats,
    }
    # load_state_dict takes one state dict per process and loads the one of this process's data-parallel rank.
    state_dicts = [None] * dist.get_world_size(group=optimizer.dp_process_group)
    state_dicts[dist.get_rank(group=optimizer.dp_process_group)] = rigid_state
    # As engine.load_checkpoint: partition every parameter first, gather the persistent ones again after.
    optimizer.checkpoint_event_prologue()
    optimizer.load_state_dict(state_dicts, load_optimizer_states=True)
    optimizer.checkpoint_event_epilogue()

    for name, value in state.buffers.items():
        engine.module.get_buffer(name).copy_(value)
    engine.global_steps = state.global_steps
    engine.global_samples = state.global_samples
    engine.skipped_steps = state.skipped_steps
    if engine.lr_scheduler is not None and state.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state.lr_scheduler)


def load_resharded_state(accelerator: Accelerator, folder: str | Path) -> None:
    """`accelerator.load_state(folder)` for a ZeRO-3 checkpoint written by another number of processes.

    The DeepSpeed engine is loaded by `load_resharded_zero3_state`; the rest as `load_state` loads it: the
    schedulers, the samplers of prepared data loaders, the objects registered with `register_for_checkpointing`,
    the micro-batch count `accelerator.step`, and this process's random states (a process whose rank the saving run
    did not have keeps its own, as `load_state` does when the file is missing).
    """
    from accelerate.checkpointing import load_accelerator_state, load_custom_state
    from accelerate.utils import DeepSpeedSchedulerWrapper

    if len(accelerator._models) != 1:
        raise ReshardError(
            f"load_resharded_state loads one prepared DeepSpeed model, the accelerator has {len(accelerator._models)}"
        )
    state = consolidate_zero3_checkpoint(folder)
    load_resharded_zero3_state(accelerator._models[0], state)
    logger.info(
        "Loaded the ZeRO-3 model and optimizer state of %s, written by %d process(es), resharded over %d.",
        folder,
        state.world_size,
        accelerator.num_processes,
    )
    # DeepSpeed's own scheduler, if any, is in the engine's state; accelerate's schedulers are in their own files.
    schedulers = [
        scheduler for scheduler in accelerator._schedulers if not isinstance(scheduler, DeepSpeedSchedulerWrapper)
    ]
    load_accelerator_state(str(folder), [], [], schedulers, accelerator._dataloaders, accelerator.process_index)
    folder = Path(folder)
    # accelerate counts micro-batches in `accelerator.step` (saved with the random states) to decide when gradients
    # are synchronised: every process takes the first process's count, so that a process whose rank the saving run
    # did not have agrees with the others.
    accelerator.step = torch.load(folder / "random_states_0.pkl", weights_only=False)["step"]
    for index, obj in enumerate(accelerator._custom_objects):
        if not (folder / f"custom_checkpoint_{index}.pkl").is_file():
            raise ReshardError(
                f"{folder} has no custom_checkpoint_{index}.pkl for the object registered for checkpointing "
                f"{index + 1}th ({type(obj).__name__}); register the same objects as the run that saved it."
            )
        load_custom_state(obj, str(folder), index)


def _deepspeed_world_size(ds_dir: Path) -> int:
    """The data-parallel world size recorded in the model-states files of `ds_dir` (any one of them: they agree)."""
    first = next(path for path in sorted(ds_dir.iterdir()) if _MODEL_STATES.match(path.name))
    return int(_load(first)["dp_world_size"])


def _rank_files(ds_dir: Path, pattern: re.Pattern[str], world_size: int) -> list[Path]:
    """The files of `ds_dir` that match `pattern`, one per rank of `world_size` in rank order; an error names the
    missing ranks."""
    by_rank: dict[int, Path] = {}
    for path in ds_dir.iterdir():
        if match := pattern.match(path.name):
            if int(match.group(2)) != 0:
                raise ReshardError(f"{path} is a tensor-parallel checkpoint file, which is not resharded here")
            by_rank[int(match.group(1))] = path
    missing = sorted(set(range(world_size)) - set(by_rank))
    if missing:
        raise ReshardError(
            f"{ds_dir} was written by {world_size} processes but lacks the files matching {pattern.pattern} of "
            f"rank(s) {missing}: every process writes its own. Restore them, or resume from an earlier checkpoint."
        )
    if len(by_rank) != world_size:
        raise ReshardError(
            f"{ds_dir} was written by {world_size} processes but also has files matching {pattern.pattern} of "
            f"rank(s) {sorted(set(by_rank) - set(range(world_size)))}: it mixes the files of two checkpoints."
        )
    return [by_rank[rank] for rank in range(world_size)]


def _load(path: Path) -> dict[str, Any]:
    # DeepSpeed pickles its own objects (the loss scaler, its config) into the files, so weights_only cannot be used.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _same(first: Any, second: Any) -> bool:
    if torch.is_tensor(first) or torch.is_tensor(second):
        return torch.equal(torch.as_tensor(first), torch.as_tensor(second))
    return first == second
