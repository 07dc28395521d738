"""The internals of transformers, TRL and accelerate that apertus_hf relies on, checked by name and signature.

Each of these is an API that is not (or not only) public and has changed between minor releases before: 5.24
renamed `past_key_values` to `cache` in masks, caches and outputs, and generation silently decoded without its past
in our model. Behaviour is tested elsewhere (parity, generation, trainers); these tests fail first and name the
internal that moved, which is what `make drift` wants to see when a new release comes out.
"""

import inspect

import pytest
import torch


def parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def test_transformers_masking_takes_the_cache_and_an_extra_mask_function():
    from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices

    # modeling_apertus: create_causal_mask(..., cache=, position_ids=, and_mask_function=document mask).
    assert {"config", "inputs_embeds", "attention_mask", "cache", "position_ids", "and_mask_function"} <= parameters(
        create_causal_mask
    )
    # modeling_apertus: document ids from restarting positions, None when a row holds one document (outside tracing).
    packed = find_packed_sequence_indices(torch.tensor([[0, 1, 0, 1, 2, 0]]))
    assert packed.tolist() == [[0, 0, 1, 1, 1, 2]]
    assert find_packed_sequence_indices(torch.arange(5)[None]) is None


def test_transformers_caches_take_layer_kwargs_and_report_lengths():
    from transformers import DynamicCache, StaticCache

    from tests.helpers import tiny_config

    config = tiny_config()
    # modeling_apertus: cache.update(key, value, layer_idx, kwargs=...) as the stock attention calls it.
    key = value = torch.zeros(1, config.num_key_value_heads, 3, config.hidden_size // config.num_attention_heads)
    dynamic = DynamicCache(config=config)
    dynamic.update(key, value, 0, kwargs={})
    # The document mask branches in Python on a dynamic cache's int length, and inside the mask on a static one's.
    assert isinstance(dynamic.get_seq_length(), int) and dynamic.get_seq_length() == 3
    static = StaticCache(config=config, max_cache_len=8)
    assert static.get_seq_length() == 0
    static.update(key, value, 0, kwargs={})
    assert isinstance(static.get_seq_length(), torch.Tensor)


def test_transformers_model_helpers_we_build_on():
    from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
    from transformers.utils.deprecation import deprecate_kwarg
    from transformers.utils.generic import merge_with_config_defaults
    from transformers.utils.output_capturing import capture_outputs

    # Our outputs carry the cache under its 5.24 name; generation reads `outputs.cache`.
    assert "cache" in BaseModelOutputWithPast.__dataclass_fields__
    assert "cache" in CausalLMOutputWithPast.__dataclass_fields__
    assert {"old_name", "version", "new_name"} <= parameters(deprecate_kwarg)
    assert "cache" in parameters(GenericForSequenceClassification.forward)
    assert "cache" in parameters(GenericForTokenClassification.forward)
    assert callable(merge_with_config_defaults) and callable(capture_outputs)


def test_transformers_generation_hands_the_model_its_cache_as_cache():
    """GenerationMixin passes the KV cache to `forward(cache=...)`; a model reading another name decodes blind."""
    from apertus_hf import ApertusForCausalLM
    from tests.helpers import tiny_config

    model = ApertusForCausalLM(tiny_config()).eval()
    seen = []
    original_forward = model.forward

    def recording_forward(*args, **kwargs):
        seen.append(sorted(name for name in kwargs if "cache" in name or name == "past_key_values"))
        return original_forward(*args, **kwargs)

    model.forward = recording_forward
    model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2, do_sample=False, pad_token_id=3)
    assert seen and all("cache" in names and "past_key_values" not in names for names in seen), seen


def test_transformers_trainer_hooks_we_use():
    from transformers import Trainer
    from transformers.trainer_pt_utils import AcceleratorConfig
    from transformers.trainer_utils import get_last_checkpoint

    # trainers/recipe.py: AdEMAMix through Trainer's own hook; CPU multi-process through a configured state.
    assert "optimizer_cls_and_kwargs" in parameters(Trainer.__init__)
    assert "use_configured_state" in AcceleratorConfig.__dataclass_fields__
    assert parameters(get_last_checkpoint) == {"folder"}


def test_transformers_tokenizer_and_collator_internals():
    from transformers.data.data_collator import DataCollatorMixin
    from transformers.integrations.mistral.tokenizer import MistralConverter
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    # tokenization/apertus.py converts tekken with MistralConverter(path).converted(); QRPO's collator is a mixin.
    assert hasattr(MistralConverter, "converted")

    class Collator(DataCollatorMixin):
        return_tensors = "pt"

        def torch_call(self, features):
            return {"count": len(features)}

    assert Collator()([{}, {}]) == {"count": 2}
    assert VERY_LARGE_INTEGER > 10**20


def test_trl_utilities_the_qrpo_trainer_calls():
    pytest.importorskip("trl")
    from trl.data_utils import is_conversational
    from trl.models.utils import prepare_deepspeed
    from trl.trainer.utils import add_fused_lm_head, generate_model_card, selective_log_softmax

    assert {"model", "temperature", "outputs"} <= parameters(add_fused_lm_head)
    assert {"logits", "index"} <= parameters(selective_log_softmax)
    assert {
        "base_model",
        "model_name",
        "hub_model_id",
        "dataset_name",
        "tags",
        "wandb_url",
        "trackio_url",
        "trainer_name",
        "trainer_citation",
        "paper_title",
        "paper_id",
    } <= parameters(generate_model_card)
    assert parameters(prepare_deepspeed) == {"model", "accelerator"}
    assert is_conversational({"prompt": [{"role": "user", "content": "hi"}]})


def test_trl_fused_head_returns_completion_log_probs():
    """qrpo.py scores sequences with `model(..., labels=, fused_lm_head=True).log_probs` after `add_fused_lm_head`."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head, selective_log_softmax

    from apertus_hf import ApertusForCausalLM
    from tests.helpers import tiny_config

    model = ApertusForCausalLM(tiny_config()).eval()
    add_fused_lm_head(model)
    input_ids = torch.randint(4, 256, (2, 7))
    labels = input_ids.masked_fill(torch.arange(7) < 3, -100)
    with torch.no_grad():
        fused = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs
        logits = model(input_ids=input_ids, use_cache=False).logits
    direct = selective_log_softmax(logits[:, :-1], input_ids[:, 1:]) * (labels[:, 1:] != -100)
    torch.testing.assert_close(fused.sum(dim=-1), direct.sum(dim=-1), rtol=1e-5, atol=1e-5)


def test_accelerate_utilities_we_use():
    from accelerate import PartialState
    from accelerate.utils import ProjectConfiguration, gather_object
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    # pretraining/build.py: the run folder as project and logging dir.
    assert {"project_dir", "logging_dir"} <= set(ProjectConfiguration.__dataclass_fields__)
    # runtime.init_cpu_process_group: PartialState(cpu=True) or PartialState(backend="gloo") (through **kwargs) before
    # an Accelerator or TRL's config builds its own.
    assert "cpu" in parameters(PartialState.__init__)
    assert inspect.signature(PartialState.__init__).parameters["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    # runtime.cpu_thread_count: `accelerate launch` hands its processes OMP_NUM_THREADS (1 unless told otherwise) and
    # ACCELERATE_DYNAMO_BACKEND, which is how a process knows the launcher chose its thread count.
    launcher_source = inspect.getsource(prepare_simple_launcher_cmd_env)
    assert 'current_env["OMP_NUM_THREADS"]' in launcher_source
    assert 'current_env["ACCELERATE_DYNAMO_BACKEND"]' in launcher_source
    # preference/sampling and scoring: one process gathers the objects of all (identity on one process).
    assert gather_object([("index", 1)]) == [("index", 1)]


def test_trls_model_card_draft_is_recognised_and_replaced():
    from trl.trainer.utils import generate_model_card

    from apertus_hf.hub import readme_author

    # hub/card.py replaces the README.md that TRL's trainers write on save; a change to TRL's card would otherwise
    # publish it in place of ours.
    draft = generate_model_card(
        base_model="org/base",
        model_name="tiny",
        hub_model_id="org/tiny",
        dataset_name=None,
        tags=["trl", "sft"],
        wandb_url=None,
        trackio_url=None,
        trainer_name="SFT",
    )
    assert readme_author(str(draft)) == "trainer"


def test_transformers_turns_restarting_positions_into_flash_attention_varlen_arguments():
    # modeling_apertus.flash_attention_document_kwargs hands FlashAttention the documents of `seq_idx` through this.
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    (cu_seq_lens_q, cu_seq_lens_k), (max_length_q, max_length_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    assert cu_seq_lens_q.tolist() == cu_seq_lens_k.tolist() == [0, 3, 5, 10]
    assert int(max_length_q) == int(max_length_k) == 5


def test_deepspeed_zero3_checkpoint_layout_and_loader_that_the_reshard_relies_on():
    """pretraining/resharding.py reads ZeRO-3 checkpoints by their layout and fills a live ZeRO-3 optimizer through
    stage3's own rigid load; each name and key below is one it touches."""
    pytest.importorskip("deepspeed")
    from accelerate import Accelerator
    from accelerate.checkpointing import load_accelerator_state, load_custom_state, save_accelerator_state
    from accelerate.state import AcceleratorState
    from accelerate.utils.constants import MODEL_NAME
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3
    from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

    # The files: accelerate saves the engine under the tag MODEL_NAME; one model-states and one optimizer-states file
    # per process, the model states with the parameter shapes of each flat group and the engine's counters.
    assert MODEL_NAME == "pytorch_model"
    assert "model.save_checkpoint(output_dir, ckpt_id" in inspect.getsource(Accelerator.save_state)
    assert "zero_pp_rank_" in inspect.getsource(DeepSpeedEngine._get_ckpt_name)
    assert "_optim_states.pt" in inspect.getsource(DeepSpeedEngine._get_rank_zero_ckpt_name)
    common_state = inspect.getsource(DeepSpeedEngine._common_checkpoint_state)
    for key in ("param_shapes=", "buffer_names=", "frozen_param_shapes=", "lr_scheduler=", "skipped_steps="):
        assert key in common_state, key
    for key in ("global_steps=", "global_samples=", "dp_world_size="):
        assert key in common_state, key
    # A flat group gives each parameter ceil(numel / world_size) elements, the padding at the end.
    assert zero3_partitioned_param_info(5, 4) == (2, 3)
    # The optimizer's state dict as saved and loaded back: the base optimizer's tensors numbered sub-group by
    # sub-group, the fp32 partitions, the loss scaler and its flags; load_state_dict takes the dict of this rank.
    rigid_save = inspect.getsource(Stage3._rigid_state_dict)
    rigid_load = inspect.getsource(Stage3._rigid_load_state_dict)
    for key in ("LOSS_SCALER", "'dynamic_loss_scale'", "'overflow'", "OPTIMIZER_STATE_DICT", "FP32_FLAT_GROUPS"):
        assert key in rigid_save and key in rigid_load, key
    assert "PARTITION_COUNT" in rigid_save and "ZERO_STAGE" in rigid_save
    assert "self.sub_group_to_group_id[sub_group_id]" in inspect.getsource(Stage3._set_fp32_optimizer_param_groups)
    assert {"state_dict_list", "load_optimizer_states"} <= parameters(Stage3.load_state_dict)
    assert "state_dict_list[dist.get_rank(group=self.dp_process_group)]" in inspect.getsource(Stage3.load_state_dict)
    stage3 = inspect.getsource(Stage3)
    for attribute in (
        "self.fp16_groups =",
        "self.sub_group_to_group_id =",
        "self.dp_process_group =",
        "self.optimizer =",
    ):
        assert attribute in stage3, attribute
    assert callable(Stage3.checkpoint_event_prologue) and callable(Stage3.checkpoint_event_epilogue)
    engine = inspect.getsource(DeepSpeedEngine)
    for attribute in ("self.global_steps =", "self.global_samples =", "self.skipped_steps =", "self.lr_scheduler ="):
        assert attribute in engine, attribute
    # A ZeRO-3 parameter knows its process group and its full shape.
    converted = inspect.getsource(Init._convert_to_deepspeed_param)
    assert "param.ds_process_group" in converted and "param.ds_shape" in converted
    # Why we reshard ourselves: the universal checkpoint restores only these keys, not AdEMAMix's exp_avg_slow. When
    # this fails, it may carry every state key and could replace the reshard.
    universal = inspect.getsource(Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    assert '["fp32", "exp_avg", "exp_avg_sq"]' in universal

    # What accelerate's load_state loads besides the engine, as load_resharded_state loads it.
    assert {"input_dir", "models", "optimizers", "schedulers", "dataloaders", "process_index"} <= parameters(
        load_accelerator_state
    )
    assert parameters(load_custom_state) == {"obj", "path", "index"}
    assert 'states["step"] = step' in inspect.getsource(save_accelerator_state)
    load_state = inspect.getsource(Accelerator.load_state)
    assert "isinstance(scheduler, DeepSpeedSchedulerWrapper)" in load_state and "custom_checkpoint_" in load_state
    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(cpu=True)
        for attribute in ("_models", "_schedulers", "_dataloaders", "_custom_objects"):
            assert getattr(accelerator, attribute) == [], attribute
    finally:
        AcceleratorState._reset_state(True)


def test_deepspeed_internals_the_post_training_recipes_use():
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed import DeepSpeedEngine
    from transformers.integrations import (
        HfDeepSpeedConfig,
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from apertus_hf.trainers.recipe import DEEPSPEED_OPTIONS_OF_THE_RECIPE

    # trainers/recipe.py: the plugin's deepspeed_config is the dict Trainer fills, "auto" options from TrainingArguments.
    assert "self.deepspeed_config = self.hf_ds_config.config" in inspect.getsource(DeepSpeedPlugin.__post_init__)
    fills = inspect.getsource(HfTrainerDeepSpeedConfig.trainer_config_process)
    assert all(f'"{option}"' in fills for option in DEEPSPEED_OPTIONS_OF_THE_RECIPE)
    # trainers/saving.py: from_pretrained loads whole while the weak reference is unset; the plugin's `dschf` holds it.
    assert "self.dschf = HfDeepSpeedConfig(" in inspect.getsource(DeepSpeedPlugin.set_deepspeed_weakref)
    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        unset_hf_deepspeed_config()
        assert not is_deepspeed_zero3_enabled()
        set_hf_deepspeed_config(config)
        assert is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()
    # trainers/qrpo.py: the reference engine is destroyed, taking its ZeRO-3 hooks off the policy, before training.
    assert callable(DeepSpeedEngine.destroy)


def test_accelerate_steps_a_deepspeed_engine_only_on_a_backward_marked_as_syncing_gradients():
    # pretraining/step.py accumulates micro-batches by hand and sets accelerator.sync_gradients to True only for a
    # step's last one: accelerate hands that flag to DeepSpeed as the accumulation boundary and calls engine.step()
    # only then. Were it to step on every backward, a run with accumulation > 1 would take an optimizer step per
    # micro-batch under ZeRO-3 (seen before this contract: 1 process x 2 micro-batches diverged from 2 processes).
    from accelerate import Accelerator
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    calls = []

    class RecordingEngine:
        def set_gradient_accumulation_boundary(self, is_boundary):
            calls.append(("boundary", is_boundary))

        def backward(self, loss, **kwargs):
            calls.append(("backward",))

        def step(self):
            calls.append(("step",))

    wrapper = DeepSpeedEngineWrapper(RecordingEngine())
    wrapper.backward(torch.ones(()), sync_gradients=False)
    wrapper.backward(torch.ones(()), sync_gradients=True)
    assert calls == [("boundary", False), ("backward",), ("boundary", True), ("backward",), ("step",)]
    source = inspect.getsource(Accelerator.backward)
    assert "self.deepspeed_engine_wrapped.backward(loss, sync_gradients=self.sync_gradients" in source
