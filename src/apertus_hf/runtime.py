"""The runtime choices every run makes in one place: the attention backend, the fused xIELU and compiled layers,
CPU threads, the CPU process group, and whether a name is a local path or a Hub id."""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import torch
from accelerate import PartialState
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .modeling_apertus import ApertusPreTrainedModel

ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2")


def check_attn_implementation(requested: str) -> None:
    """Raise a ValueError naming the choices when `requested` is not an attention backend a recipe can ask for."""
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={requested!r} is not one of {ATTENTION_IMPLEMENTATIONS}.")


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """The attention backend a run uses: `requested`, or for "auto" FlashAttention-2 where it runs, else SDPA.

    FlashAttention-2 (`flash-attn`) on CUDA attends over packed rows as variable-length sequences: the model turns the
    batch's `seq_idx` (each token's document, from PackedBatchCollator) into FlashAttention's variable-length
    arguments, so no (seq x seq) mask is built and masked-out blocks cost nothing. SDPA, eager and flex get a document
    mask built from the same `seq_idx` instead.
    """
    check_attn_implementation(requested)
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def apply_speed_options(model: torch.nn.Module, xielu_implementation: str, compile_layers: bool) -> None:
    """Set the xIELU implementation of an apertus_hf model and compile its decoder layers in place if asked."""
    if not isinstance(model, ApertusPreTrainedModel):
        raise ValueError(
            f"{type(model).__name__} is not an apertus_hf model, so xIELU and layer compilation cannot be set on it; "
            "train an `apertus` checkpoint (init_from must hold model_type apertus)."
        )
    model.set_xielu_implementation(xielu_implementation)
    if compile_layers:
        model.compile_decoder_layers()


def cpu_thread_count(requested: int | None, device: torch.device, num_processes: int) -> tuple[int, str]:
    """Intra-op threads for a run and why: (threads, reason). The caller applies them with torch.set_num_threads.

    `accelerate launch` sets OMP_NUM_THREADS=1 unless given `--cpu` or `--num_cpu_threads_per_process`, which leaves a
    single CPU process on one core. So a lone CPU process that the user gave no explicit count (`requested` None)
    and that sees OMP_NUM_THREADS=1 from a launcher takes the cores it may run on; an explicit `requested` always wins.
    """
    current = torch.get_num_threads()
    if requested is not None:
        return requested, "set by cpu_threads"
    launched_with_one = os.environ.get("OMP_NUM_THREADS") == "1" and "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if device.type != "cpu" or num_processes > 1 or not launched_with_one:
        return current, "the process default (OMP_NUM_THREADS or torch's choice)"
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return available, "every core this process may use (accelerate launch defaulted OMP_NUM_THREADS to 1)"


def init_cpu_process_group() -> bool:
    """Set up the process group of a multi-process run on CPU (gloo), before any `Accelerator` or `TrainingArguments`.

    Without it, DeepSpeed picks a backend this torch build lacks, and DDP launched without `--cpu` forms no group:
    in both cases each rank would train alone. DeepSpeed needs the backend named; DDP needs the state told it runs on
    the CPU. Returns True when it set the state up (the caller then reuses it), False on GPUs or in one process.
    """
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        PartialState(backend="gloo")
    else:
        PartialState(cpu=True)
    return True


# A name ending like a data or weights file is a path, although e.g. "corpus/part.jsonl" is a valid repo id too.
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".gz", ".safetensors", ".bin")


class SourceNotFoundError(FileNotFoundError):
    """A model, tokenizer or data source that is neither on this machine nor a Hub id this run may download."""


def resolve_source(value: str, what: str, hint: str = "") -> Path | str:
    """The one rule for "local path or Hub id": a Path when `value` exists here (or is a glob that matches a file
    here), else `value` as a Hub repo id.

    Raises SourceNotFoundError, naming `what` (e.g. "init_from") and `hint`, when `value` is a glob that matches no
    file, when it reads as a local path that does not exist (it starts with `.`, `/` or `~`, has other than one `/`,
    ends like a data file, or its first component is a folder here, such as outputs/...), or when it is not a valid
    repo id. A Hub id is not looked up here: offline, the library still finds it in the local Hub cache.
    """
    expanded = Path(value).expanduser()
    suffix = f" {hint}" if hint else ""
    if any(character in value for character in "*?["):
        if not glob.glob(str(expanded), recursive=True):
            raise SourceNotFoundError(f"{what}={value!r}: the glob matches no file (looked in {Path.cwd()}).{suffix}")
        return expanded
    if expanded.exists():
        return expanded
    first_component = Path(value).parts[0] if Path(value).parts else ""
    reads_as_path = (
        value.startswith((".", "/", "~"))
        or value.count("/") != 1
        or Path(first_component).is_dir()
        or value.endswith(DATA_FILE_SUFFIXES)
    )
    if reads_as_path:
        raise SourceNotFoundError(f"{what}={value!r}: no such file or folder ({Path(value).absolute()}).{suffix}")
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise SourceNotFoundError(
            f"{what}={value!r} is neither a file or folder here nor a Hub repo id (ORG/NAME).{suffix}"
        ) from None
    return value
