"""`PretrainConfig`: every option of the pretraining loop, with its help text.

The defaults are the embedded default run: a small Apertus trained on the corpus and tokenizer shipped in `data/`,
sized to finish in a few minutes on a 2-core CPU. The recipes in `recipes/configs/<size>/pretrain.yaml` override
them up to Apertus-8B/70B with the values of the Apertus tech report.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub.errors import StrictDataclassError
from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedConfig

from ..configuration_apertus import PRESETS, ApertusConfig
from ..runtime import check_attn_implementation
from ..training_facts import portable_path
from .plan import RunPlan, batch_segments_in_samples, batch_segments_in_steps, resolve_stages, steps_for_samples

RECIPE_FILE_NAME = "pretrain_config.yaml"
"""The resolved options of a run, saved in its output_dir and with its exported model (loadable with `--config`)."""

DEFAULT_DATA = [{"path": "data/corpus"}]
"""The embedded default run's training data: the corpus shipped in data/."""

PATH_OPTIONS = ("output_dir", "init_from", "tokenizer")
"""The options that hold a path (besides the `path` of each data source)."""


def fresh_model_config(model_type: str, preset: str, values: dict[str, Any]) -> PreTrainedConfig:
    """The config of a fresh model: an ApertusConfig of `preset` with `values`, or for another `model_type` (an
    ablation baseline such as llama) that type's config with the preset's shapes and `values`."""
    if model_type == "apertus":
        return ApertusConfig.from_preset(preset, **values)
    # Apertus' embeddings are untied; the baseline keeps that unless the values say otherwise.
    return AutoConfig.for_model(
        model_type, **{"tie_word_embeddings": False, **copy.deepcopy(PRESETS[preset]), **values}
    )


@dataclass
class PretrainConfig:
    # Run
    output_dir: str = field(
        default="outputs/pretrain-tiny",
        metadata={
            "help": (
                "Folder of the run: checkpoints/, the exported model (model/), metrics.jsonl and train.log. Launching "
                "again into a folder that holds a run resumes it; see resume and overwrite_output_dir."
            )
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of the model initialisation and the data order."})
    resume: bool = field(
        default=True,
        metadata={
            "help": (
                "Resume from the latest complete checkpoint in output_dir/checkpoints when there is one. false in a "
                "folder that already holds a run stops with an error (unless overwrite_output_dir), so that two runs "
                "never mix."
            )
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": (
                "Start afresh even when output_dir holds a run: the old folder is first renamed to the sibling "
                "<output_dir>.replaced-<UTC time> (never deleted), and the new run gets an empty output_dir."
            )
        },
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": (
                "Intra-op CPU threads per process (torch.set_num_threads). None: the process default, except that a "
                "single CPU process started by `accelerate launch` (which sets OMP_NUM_THREADS=1) uses every core it "
                "may run on. A resume is bit for bit on CPU only with as many threads as the run that saved."
            )
        },
    )

    # Model
    model_preset: str = field(
        default="small", metadata={"help": f"ApertusConfig preset the model starts from: one of {sorted(PRESETS)}."}
    )
    model_type: str = field(
        default="apertus",
        metadata={
            "help": (
                "Architecture of a fresh model: apertus (apertus_hf's model), or the model_type of a transformers causal "
                "LM such as llama (the Llama-style baseline of the Apertus report's ablations), built with the preset's "
                "shapes plus model_overrides. A stock model trains without the chunked loss (set chunked_loss false), "
                "the xIELU implementation option and layer compilation. With init_from the loaded folder decides."
            )
        },
    )
    model_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": (
                "ApertusConfig fields set on top of the preset, e.g. {num_hidden_layers: 8}. The vocabulary size always "
                "follows the tokenizer. With init_from they apply to the loaded model's config and may only set "
                "rope_parameters (merged key by key, e.g. {rope_parameters: {rope_theta: 2000000}}) and "
                "max_position_embeddings; a key that would change the architecture is refused."
            )
        },
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": (
                "Continue pretraining from this model folder or Hub id instead of a fresh initialisation: its weights "
                "only, with a new optimizer and schedule (Megatron's --finetune). model_preset is then ignored, and "
                "model_overrides may only set the RoPE parameters and max_position_embeddings (long-context stages)."
            )
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": (
                "Attention backend. auto: flash_attention_2 when flash-attn is installed and the run is on CUDA "
                "(varlen over the packed documents), else sdpa (with the document mask). Or sdpa, eager, "
                "flex_attention, flash_attention_2: packed rows stay document-masked on all of them."
            )
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    chunked_loss: bool = field(
        default=True,
        metadata={
            "help": (
                "Compute the LM head and cross-entropy in chunks at kept targets only, never the full logits "
                "(apertus_hf.loss); false builds the logits as transformers does."
            )
        },
    )
    xielu_implementation: Literal["auto", "eager", "compiled"] = field(
        default="auto",
        metadata={"help": "xIELU: compiled (fused kernels), eager (op by op), auto (compiled on CUDA only)."},
    )
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": (
                "torch.compile each decoder layer (regional compilation: one graph reused by every layer); the "
                "first steps pay the compilation."
            )
        },
    )

    # Data
    tokenizer: str = field(
        default="data/tokenizer",
        metadata={
            "help": (
                "Tokenizer folder or Hub id, or 'apertus' for the real Apertus tokenizer built offline from tekken v3 "
                "(needs mistral-common); its BOS/EOS/pad ids are used for packing and saved with the model."
            )
        },
    )
    data: list[dict[str, Any]] = field(
        default_factory=lambda: [dict(source) for source in DEFAULT_DATA],
        metadata={
            "help": (
                "Training sources, each a mapping with `path` (file, folder, glob or Hub dataset id) and optionally `weight`, "
                "`text_column`, `split`, `name`, `format` (see apertus_hf.data.DataSource). Several sources are mixed by "
                "weight. A folder written by recipes/tokenize_data.py is pre-tokenized: it is read by memory map, not "
                "tokenized; a stage's sources must then all be such folders (mixed by weight row by row) and streaming "
                "false, and eval_documents holds out the last documents of the first one (docs/pretokenized_data.md)."
            )
        },
    )
    eval_data: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={
            "help": (
                "Held-out sources for evaluation, same format as `data`. Empty: hold out `eval_documents` documents of "
                "`data` instead."
            )
        },
    )
    eval_documents: int = field(
        default=32,
        metadata={"help": "Documents of `data` held out for evaluation when `eval_data` is empty (0: no evaluation)."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": (
                "Stream the data with datasets.IterableDataset instead of tokenizing it up front (for corpora larger than "
                "RAM). A resume then re-reads the consumed part of the stream to find its place."
            )
        },
    )
    record_row_ids: bool = field(
        default=False,
        metadata={
            "help": (
                "Write the rows each optimizer step consumed (their indices in the stage's packed rows, over all "
                "processes) into its metrics.jsonl record as `data/row_ids`: an audit of the data order (what a "
                "resumed run or a memorization audit read). Not with streaming, whose rows have no index."
            )
        },
    )
    on_bad_record: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "help": "What a malformed record does: `error` stops with its file and line, `skip` skips and counts it."
        },
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per packed row."})
    tokenization_processes: int | None = field(
        default=None,
        metadata={"help": "Processes for tokenization (datasets num_proc); None tokenizes in the main process."},
    )
    stages: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={
            "help": (
                "Data stages, in the order they run, each a mapping with `data` (sources, as the `data` option), "
                "optionally `name` and `seed` (the data seed of the stage; default seed + its index) and where it "
                "starts: `start_step`, `start_sample` or `start_tokens` (the first stage starts at step 0). At a "
                "switch the data seed changes and the stage's data starts from its first sample, as in the Apertus "
                "run. Empty: one stage of `data`; with stages, `data` must be left empty. Held-out evaluation "
                "documents come from the first stage when eval_data is empty."
            )
        },
    )

    # Goldfish loss
    goldfish: bool = field(
        default=True,
        metadata={
            "help": (
                "Apply the Goldfish loss (Hans et al. 2024; Apertus tech report, arXiv 2509.14233, §2.3 'Optimizer & "
                "Training Recipe'): leave out about 1/k of the targets, chosen by a hash "
                "of the h preceding label ids, so that no passage is learned verbatim."
            )
        },
    )
    goldfish_k: int = field(default=50, metadata={"help": "Goldfish drop frequency: about 1 target in k is dropped."})
    goldfish_h: int = field(
        default=50, metadata={"help": "Goldfish context width: the number of label ids hashed per decision."}
    )

    # Documents and loss
    document_masking: bool = field(
        default=True,
        metadata={
            "help": (
                "Keep attention inside each packed document (Megatron's --reset-attention-mask), on every attention "
                "backend. false: each packed row is attended causally as a whole, across its documents, which is what "
                "Megatron's Transformer Engine attention ran even with that flag (docs/document_masking.md); the "
                "long-context recipes turn it off."
            )
        },
    )
    reset_position_ids: bool = field(
        default=True,
        metadata={
            "help": (
                "Restart the position ids at each packed document (Megatron's --reset-position-ids); false: they run "
                "0 .. seq_len-1 along each row. Independent of document_masking."
            )
        },
    )
    loss_averaging: Literal["per_token", "per_micro_batch"] = field(
        default="per_token",
        metadata={
            "help": (
                "per_token: the loss of a step is the mean over all its kept targets, on every micro-batch and "
                "process, as in one large batch. per_micro_batch: the mean over each micro-batch's kept targets, then "
                "averaged over micro-batches and processes, as Megatron without --calculate-per-token-loss (the Apertus "
                "runs); a micro-batch with few targets then weighs as much as a full one."
            )
        },
    )

    # Batch
    per_device_batch_size: int = field(default=16, metadata={"help": "Packed rows per device and micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches per optimizer step (derived from global_batch_size when that is set)."},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": (
                "Rows per optimizer step over all processes (Megatron's --global-batch-size). None: "
                "per_device_batch_size x gradient_accumulation_steps x processes. When set, the accumulation steps "
                "are derived from it (it must be a multiple of per_device_batch_size x processes); train_samples "
                "needs it."
            )
        },
    )
    batch_ramp: list[list[int]] = field(
        default_factory=list,
        metadata={
            "help": (
                "Batch-size changes mid-run, keeping the learning rate (Apertus doubles its global batch). Counted in "
                "steps: [[step, gradient_accumulation_steps], ...], from that optimizer step on. With train_samples: "
                "[[sample, global_batch_size], ...], from the first step at or after that many consumed samples "
                "(Megatron's consumed-samples counter)."
            )
        },
    )

    # Optimizer
    optimizer: Literal["ademamix", "adamw"] = field(
        default="ademamix", metadata={"help": "AdEMAMix (the Apertus recipe) or torch AdamW."}
    )
    learning_rate: float = field(default=1e-2, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(
        default=0.1,
        metadata={
            "help": "Decoupled weight decay; norms and xIELU scalars are excluded, embeddings and LM head decay."
        },
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "beta1 (fast EMA of the gradient)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "beta2 (EMA of the squared gradient)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Epsilon added to the denominator."})
    ademamix_beta3: float = field(default=0.9999, metadata={"help": "AdEMAMix final beta3 (slow EMA of the gradient)."})
    ademamix_alpha: float = field(default=8.0, metadata={"help": "AdEMAMix final alpha (weight of the slow EMA)."})
    ademamix_warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps over which alpha and beta3 warm up (Apertus: 100k). None: the whole run."},
    )
    max_grad_norm: float = field(
        default=0.1, metadata={"help": "Gradient clipping by global norm (Apertus: 0.1); 0 disables it."}
    )

    # Schedule (warmup-stable-decay), counted in optimizer steps or, with train_samples, in samples
    max_steps: int = field(
        default=180,
        metadata={"help": "Optimizer steps of the run (derived from train_samples when that is set)."},
    )
    warmup_steps: int = field(default=18, metadata={"help": "Linear warmup steps from 0 to the peak learning rate."})
    decay_fraction: float = field(
        default=0.2,
        metadata={
            "help": (
                "Fraction of the run spent in the final cooldown (Apertus: ~0.11); 0: none, the learning rate stays at "
                "its peak after the warmup (the long-context stages)."
            )
        },
    )
    train_samples: int | None = field(
        default=None,
        metadata={
            "help": (
                "Count the run and its schedule in samples (rows of seq_len tokens), as Megatron-LM's --train-samples: "
                "the run takes every full global batch that fits in this many samples, and the learning rate of a step "
                "follows the samples consumed before it, also across a batch_ramp. Needs global_batch_size, "
                "warmup_samples and decay_samples; max_steps is then derived, and warmup_steps and decay_fraction are "
                "not used. None: count in steps."
            )
        },
    )
    warmup_samples: int | None = field(
        default=None,
        metadata={"help": "With train_samples: linear warmup over this many samples (--lr-warmup-samples)."},
    )
    decay_samples: int | None = field(
        default=None,
        metadata={"help": "With train_samples: the cooldown's length in samples (--lr-wsd-decay-samples); 0: none."},
    )
    decay_shape: Literal["1-sqrt", "linear", "cosine"] = field(
        default="1-sqrt", metadata={"help": "Shape of the cooldown."}
    )
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Learning rate at the end of the cooldown, as a fraction of the peak."}
    )

    stop_at_step: int | None = field(
        default=None,
        metadata={
            "help": (
                "Save a checkpoint and stop after this optimizer step, e.g. to fit a cluster job's time slot; "
                "relaunching without it continues the same run (Megatron-LM's --exit-interval)."
            )
        },
    )

    # Logging, evaluation, checkpoints
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every this many optimizer steps."})
    eval_steps: int = field(
        default=60, metadata={"help": "Evaluate every this many optimizer steps (and at the end); 0 only at the end."}
    )
    max_eval_batches: int | None = field(
        default=8, metadata={"help": "Cap on evaluation micro-batches per evaluation; None: all."}
    )
    checkpoint_steps: int = field(
        default=60, metadata={"help": "Save a resumable checkpoint every this many optimizer steps; 0 disables."}
    )
    keep_checkpoints: int = field(
        default=2, metadata={"help": "Complete checkpoints to keep (older ones are deleted)."}
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata={"help": "Accelerate trackers to log to besides metrics.jsonl, e.g. [tensorboard] or [wandb]."},
    )
    peak_flops_per_device: float | None = field(
        default=None,
        metadata={"help": "Peak FLOP/s of one device for MFU; None: looked up from the GPU name (no MFU on CPU)."},
    )
    progress_bar: bool = field(default=True, metadata={"help": "Show a tqdm progress bar on the main process."})

    # Publishing
    license: str | None = field(
        default=None,
        metadata={
            "help": (
                "Hub license id of the trained model (e.g. apache-2.0), written to its training facts and card; "
                "None: unknown, and the model card warns that it needs one before publishing."
            )
        },
    )
    hub_model_id: str | None = field(
        default=None,
        metadata={
            "help": (
                "Hub repo id (ORG/NAME) that recipes/pretrain.py publishes the exported model to, with its model card "
                "(apertus_hf.hub.publish; needs a token, e.g. `hf auth login`). None: no upload."
            )
        },
    )
    hub_private_repo: bool | None = field(
        default=None,
        metadata={"help": "Create the Hub repo as private (true) or public (false); None: the Hub's default."},
    )

    def __post_init__(self):
        positive = (
            "seq_len",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "max_steps",
            "logging_steps",
            "keep_checkpoints",
            "goldfish_k",
            "goldfish_h",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads={self.cpu_threads} must be >= 1 (or None for the default).")
        for name in ("eval_steps", "checkpoint_steps", "eval_documents", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 disables it).")
        check_attn_implementation(self.attn_implementation)
        if self.record_row_ids and self.streaming:
            raise ValueError(
                "record_row_ids needs indexed rows, and a stream has none: set streaming false or record_row_ids false."
            )
        self._check_model_type()
        if self.model_preset not in PRESETS:
            raise ValueError(f"model_preset={self.model_preset!r} is not a preset; choose one of {sorted(PRESETS)}.")
        self._check_model_overrides()
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate} must be a positive number.")
        if not self.data and not self.stages:
            raise ValueError("data is empty; give at least one source, e.g. [{path: data/corpus}].")
        if self.stages:
            if self.data not in ([], DEFAULT_DATA):
                raise ValueError(
                    "Both data and stages are set; with stages, give each stage's sources in its `data` and leave the "
                    "top-level data out."
                )
            self.data = []
        for sources_name in ("data", "eval_data"):
            for source in getattr(self, sources_name):
                if "path" not in source:
                    raise ValueError(f"Every entry of {sources_name} needs a `path`; got {source!r}.")
        if self.global_batch_size is not None and (
            self.global_batch_size < 1 or self.global_batch_size % self.per_device_batch_size
        ):
            raise ValueError(
                f"global_batch_size={self.global_batch_size} must be a positive multiple of per_device_batch_size="
                f"{self.per_device_batch_size} (times the number of processes)."
            )
        if self.train_samples is None:
            self._check_step_schedule()
        else:
            self._check_sample_schedule()
            self.max_steps = steps_for_samples(
                batch_segments_in_samples(self.batch_ramp, self.global_batch_size), self.train_samples
            )
            if self.max_steps < 1:
                raise ValueError(
                    f"train_samples={self.train_samples:,} is less than one global batch ({self.global_batch_size})."
                )
        # Structure and order of the stages; their start steps are resolved again with the real process count.
        self.run_plan(processes=1)
        if self.loss_averaging not in ("per_token", "per_micro_batch"):
            raise ValueError(f"loss_averaging={self.loss_averaging!r} must be per_token or per_micro_batch.")

    def _check_model_type(self) -> None:
        if self.model_type == "apertus":
            return
        if self.model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(self.model_type, list(CONFIG_MAPPING), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"model_type={self.model_type!r} is no transformers model type; {hint}Use apertus or e.g. llama, "
                "mistral, qwen2."
            )
        refused = {
            "chunked_loss": (self.chunked_loss, "set chunked_loss: false (the chunked loss is apertus_hf's model's)"),
            "compile_layers": (self.compile_layers, "set compile_layers: false"),
            "init_from": (
                self.init_from is not None,
                "leave init_from out: the loaded folder decides the architecture",
            ),
        }
        for option, (is_set, fix) in refused.items():
            if is_set:
                raise ValueError(f"{option} does not work with model_type={self.model_type!r}: {fix}.")
        if self.document_masking != self.reset_position_ids:
            # Stock transformers models find the packed documents from position ids that restart at each document
            # (masking_utils.find_packed_sequence_indices): they mask documents exactly when the positions restart.
            raise ValueError(
                f"model_type={self.model_type!r} masks the packed documents exactly when their position ids restart, so "
                f"document_masking={self.document_masking} needs reset_position_ids={self.document_masking}; set both "
                "true or both false."
            )

    def _check_model_overrides(self) -> None:
        """Build the fresh model's config now (build.pretraining_model_config adds the tokenizer's ids), so that a shape
        or flag the architecture refuses fails before any data is read."""
        if self.init_from is not None:
            return
        try:
            fresh_model_config(self.model_type, self.model_preset, self.model_overrides)
        # transformers' configs are huggingface_hub strict dataclasses: their checks raise StrictDataclassError.
        except (ValueError, TypeError, StrictDataclassError) as error:
            raise ValueError(
                f"model_overrides={self.model_overrides} on preset {self.model_preset!r} do not give a valid {self.model_type} "
                f"config: {error}"
            ) from error

    def _check_step_schedule(self) -> None:
        for name in ("warmup_samples", "decay_samples"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name} counts the schedule in samples and needs train_samples; set both, or neither."
                )
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction={self.decay_fraction} must be in [0, 1] (0: no cooldown).")
        if self.decay_fraction > 0 and round(self.decay_fraction * self.max_steps) < 1:
            raise ValueError(
                f"decay_fraction={self.decay_fraction} x max_steps={self.max_steps} rounds to no cooldown step; raise "
                "decay_fraction or max_steps, or set decay_fraction 0 for a constant learning rate after the warmup."
            )
        if self.warmup_steps + round(self.decay_fraction * self.max_steps) > self.max_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} plus the cooldown ({self.decay_fraction} x max_steps="
                f"{self.max_steps}) exceed max_steps; shorten the warmup or lower decay_fraction."
            )
        previous_step = 0
        for entry in self.batch_ramp:
            if len(entry) != 2 or entry[0] <= previous_step or entry[1] < 1:
                raise ValueError(
                    f"batch_ramp={self.batch_ramp} must list [step, gradient_accumulation_steps] pairs with "
                    "increasing steps > 0 and accumulation steps >= 1 (with train_samples: [sample, global_batch_size])."
                )
            previous_step = entry[0]

    def _check_sample_schedule(self) -> None:
        missing = [
            name for name in ("global_batch_size", "warmup_samples", "decay_samples") if getattr(self, name) is None
        ]
        if missing:
            raise ValueError(
                f"train_samples counts the schedule in samples and needs {', '.join(missing)} too (Megatron's "
                "--global-batch-size, --lr-warmup-samples, --lr-wsd-decay-samples)."
            )
        if self.train_samples < 1 or self.warmup_samples < 0 or self.decay_samples < 0:
            raise ValueError("train_samples must be >= 1, warmup_samples and decay_samples >= 0.")
        if self.warmup_samples + self.decay_samples > self.train_samples:
            raise ValueError(
                f"warmup_samples={self.warmup_samples:,} plus decay_samples={self.decay_samples:,} exceed train_samples="
                f"{self.train_samples:,}; shorten the warmup or the cooldown."
            )
        previous_sample = 0
        for entry in self.batch_ramp:
            if len(entry) != 2 or not previous_sample < entry[0] < self.train_samples or entry[1] < 1:
                raise ValueError(
                    f"batch_ramp={self.batch_ramp} must list [sample, global_batch_size] pairs with increasing samples "
                    f"inside the run (0 < sample < train_samples={self.train_samples:,}) and sizes >= 1."
                )
            if entry[1] % self.per_device_batch_size:
                raise ValueError(
                    f"batch_ramp's global_batch_size {entry[1]} is no multiple of per_device_batch_size="
                    f"{self.per_device_batch_size}."
                )
            previous_sample = entry[0]

    def run_plan(self, processes: int) -> RunPlan:
        """The run's steps, batch sizes, schedule positions and data stages with `processes` data-parallel processes."""
        rows_per_micro_batch = self.per_device_batch_size * processes
        if self.train_samples is None:
            accumulation = self.gradient_accumulation_steps
            if self.global_batch_size is not None:
                accumulation = self._micro_batches(self.global_batch_size, rows_per_micro_batch, processes)
            segments = batch_segments_in_steps(self.batch_ramp, rows_per_micro_batch, accumulation)
            plan = RunPlan(
                self.seq_len,
                "steps",
                segments,
                self.max_steps,
                warmup=self.warmup_steps,
                decay=round(self.decay_fraction * self.max_steps),
                total=self.max_steps,
                rows_per_micro_batch=rows_per_micro_batch,
            )
        else:
            segments = batch_segments_in_samples(self.batch_ramp, self.global_batch_size)
            for segment in segments:
                self._micro_batches(segment.rows_per_step, rows_per_micro_batch, processes)
            plan = RunPlan(
                self.seq_len,
                "samples",
                segments,
                self.max_steps,
                warmup=self.warmup_samples,
                decay=self.decay_samples,
                total=self.train_samples,
                rows_per_micro_batch=rows_per_micro_batch,
            )
        stages = resolve_stages(self.stages, self.seed, segments, self.seq_len, self.max_steps)
        return dataclasses.replace(plan, stages=stages)

    def _micro_batches(self, global_rows: int, rows_per_micro_batch: int, processes: int) -> int:
        if global_rows % rows_per_micro_batch:
            raise ValueError(
                f"A global batch of {global_rows} rows is no multiple of per_device_batch_size="
                f"{self.per_device_batch_size} x {processes} process(es); change the batch sizes or the number of "
                "processes."
            )
        return global_rows // rows_per_micro_batch

    def save(self, folder: str | Path, portable: bool = False) -> Path:
        """Write the options to `folder/pretrain_config.yaml`. `portable`: without this machine's absolute paths
        (training_facts.portable_path), for a file that is published with the model."""
        options = dataclasses.asdict(self)
        if portable:
            for name in PATH_OPTIONS:
                if options[name] is not None:
                    options[name] = portable_path(options[name])
            for name in ("data", "eval_data"):
                options[name] = [{**source, "path": portable_path(str(source["path"]))} for source in options[name]]
            for stage in options["stages"]:
                stage["data"] = [{**source, "path": portable_path(str(source["path"]))} for source in stage["data"]]
        path = Path(folder) / RECIPE_FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(options, sort_keys=False))
        return path
