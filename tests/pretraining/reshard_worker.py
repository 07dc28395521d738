"""A tiny model with AdEMAMix under DeepSpeed ZeRO-3, run by tests/pretraining/test_resharding.py through
`accelerate launch` on any number of CPU processes.

Optionally loads a checkpoint with `load_resharded_state` and saves again at once (`--loaded_save`), then takes
one optimizer step on the fixed global batch and writes the full parameters after it (`--step_after_load`). Then
it trains `--train_steps` steps, saves (`--checkpoint`), takes one more step and writes the full parameters after
that one (`--step_after_checkpoint`): the step a resumed run must reproduce.
"""

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from deepspeed.utils import safe_get_full_fp32_param
from transformers import AutoModelForCausalLM

from apertus_hf.optim import AdEMAMix, build_parameter_groups
from apertus_hf.pretraining.resharding import load_resharded_state
from apertus_hf.runtime import init_cpu_process_group
from tests.helpers import tiny_config

GLOBAL_ROWS = 4
SEQ_LEN = 24
# Flat groups of a few thousand elements: several per parameter group, with other boundaries on 1 and 2 processes.
SUB_GROUP_SIZE = 6000


class Counter:
    """A registered checkpointing object, which the resharded load restores as `load_state` would."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master weight, gathered from all processes (collective)."""
    return {
        name.removeprefix("module."): safe_get_full_fp32_param(param).detach().cpu().clone()
        for name, param in model.named_parameters()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resume_from")
    parser.add_argument("--loaded_save")
    parser.add_argument("--step_after_load")
    parser.add_argument("--train_steps", type=int, default=0)
    parser.add_argument("--checkpoint")
    parser.add_argument("--step_after_checkpoint")
    args = parser.parse_args()

    init_cpu_process_group()  # gloo: without it each CPU process would train alone
    accelerator = Accelerator()
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = GLOBAL_ROWS // accelerator.num_processes
    ds_config["train_batch_size"] = GLOBAL_ROWS
    ds_config["gradient_accumulation_steps"] = 1
    ds_config["gradient_clipping"] = 0.1
    ds_config["zero_optimization"]["sub_group_size"] = SUB_GROUP_SIZE
    set_seed(0)
    # 48 = 2 x 24: the xIELU scalars (1 element) and odd-sized vectors need padding on 2 processes.
    model = AutoModelForCausalLM.from_config(tiny_config(hidden_size=48, intermediate_size=97, vocab_size=253))
    # A placeholder lr and short warmups: a resume that kept the constructor's lr or lost the step would differ.
    optimizer = AdEMAMix(build_parameter_groups(model, 0.1), lr=1.0, alpha_warmup_steps=8, beta3_warmup_steps=8)
    model, optimizer = accelerator.prepare(model, optimizer)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)

    batch = torch.randint(4, 253, (GLOBAL_ROWS, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    rows = GLOBAL_ROWS // accelerator.num_processes
    local = batch[accelerator.process_index * rows : (accelerator.process_index + 1) * rows]

    def step() -> float:
        loss = model(input_ids=local, labels=local).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        counter.value += 1
        return loss.item()

    def record(path: str) -> None:
        parameters = full_parameters(model)
        if accelerator.is_main_process:
            torch.save(parameters, path)

    if args.resume_from:
        load_resharded_state(accelerator, args.resume_from)
        accelerator.save_state(args.loaded_save)
        step()
        record(args.step_after_load)
    for index in range(args.train_steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-2 * (index + 1) / args.train_steps
        step()
    if args.checkpoint:
        accelerator.save_state(args.checkpoint)
        step()
        record(args.step_after_checkpoint)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
