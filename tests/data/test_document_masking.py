"""The two document switches of pretraining, each on and off: the batches of PackedBatchCollator (`seq_idx`,
`position_ids`) and the function the model computes on them, on every attention backend."""

import importlib.util

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import flash_attention_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from apertus_hf import ApertusForCausalLM
from apertus_hf.data import PackedBatchCollator
from apertus_hf.data.packing import pack_token_ids
from apertus_hf.modeling_apertus import flash_attention_document_kwargs, repeat_kv
from tests.helpers import tiny_config

SWITCHES = [(True, True), (True, False), (False, True), (False, False)]
SWITCH_IDS = ["masked-reset", "masked-not-reset", "unmasked-reset", "unmasked-not-reset"]

# Three documents of 4, 7 and 3 tokens, i.e. 6, 9 and 5 with <s> and </s>, packed into rows of 12: row 0 holds the
# first document and the start of the second, row 1 the rest of the second, the third and 4 tokens of padding.
DOCUMENT_SIZES = (4, 7, 3)
SEQ_LEN = 12
PACKED_POSITIONS = [list(range(6)) + list(range(6)), list(range(3)) + list(range(5)) + list(range(4))]
DOCUMENTS = [[0] * 6 + [1] * 6, [0] * 3 + [1] * 5 + [2] * 4]


def packed_rows() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    documents = [torch.randint(4, 256, (size,), generator=generator).tolist() for size in DOCUMENT_SIZES]
    packed = pack_token_ids(documents, SEQ_LEN, bos_id=1, eos_id=2, pad_id=3)
    return [{column: packed[column][row].tolist() for column in packed} for row in range(2)]


def test_packed_rows_are_the_ones_the_expectations_describe():
    assert [row["position_ids"] for row in packed_rows()] == PACKED_POSITIONS


@pytest.mark.parametrize(("document_masking", "reset_position_ids"), SWITCHES, ids=SWITCH_IDS)
def test_collator_gives_the_documents_and_positions_each_switch_asks_for(document_masking, reset_position_ids):
    collator = PackedBatchCollator(
        goldfish_k=None, document_masking=document_masking, reset_position_ids=reset_position_ids
    )
    batch = collator(packed_rows())
    assert sorted(batch) == ["input_ids", "labels", "position_ids", "seq_idx"]
    assert batch["seq_idx"].tolist() == (DOCUMENTS if document_masking else [[0] * SEQ_LEN] * 2)
    assert batch["position_ids"].tolist() == (PACKED_POSITIONS if reset_position_ids else [list(range(SEQ_LEN))] * 2)
    # Neither switch touches the tokens or the loss mask (the target after each </s> stays masked).
    rows = packed_rows()
    assert batch["input_ids"].tolist() == [row["input_ids"] for row in rows]
    assert batch["labels"].tolist() == [row["labels"] for row in rows]
    assert (batch["labels"][0, [0, 6]] == -100).all() and (batch["labels"][1, 3:] == -100).sum() == 5


def test_collator_rejects_a_switch_that_is_not_a_bool():
    with pytest.raises(ValueError, match="document_masking must be true or false, got 'yes'"):
        PackedBatchCollator(document_masking="yes")


def _model(backend: str) -> ApertusForCausalLM:
    torch.manual_seed(0)
    model = ApertusForCausalLM(tiny_config()).eval()
    model.set_attn_implementation(backend)
    return model


def _segments() -> list[tuple[int, int, int]]:
    """(row, start, end) of every document piece of the two packed rows."""
    segments = []
    for row, documents in enumerate(DOCUMENTS):
        for document in sorted(set(documents)):
            positions = [i for i, d in enumerate(documents) if d == document]
            segments.append((row, positions[0], positions[-1] + 1))
    return segments


def _causal_row_logits(model: ApertusForCausalLM, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Each row attended causally as a whole, with the given positions: an explicit additive 4D mask on eager
    attention, which `transformers` uses as it is."""
    length = input_ids.shape[1]
    causal = torch.full((1, 1, length, length), torch.finfo(torch.float32).min).triu(1)
    model.set_attn_implementation("eager")
    return model(input_ids, position_ids=position_ids, attention_mask=causal, use_cache=False).logits


# FlexAttention and FlashAttention are checked on CUDA below: on the CPU, transformers' FlexAttention path is wrong
# for any mask that is not purely causal (tests/test_modeling.py), and flash-attn needs a GPU.
@torch.no_grad()
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize(("document_masking", "reset_position_ids"), SWITCHES, ids=SWITCH_IDS)
def test_model_attends_within_documents_only_when_masking_is_on(backend, document_masking, reset_position_ids):
    model = _model(backend)
    batch = PackedBatchCollator(
        goldfish_k=None, document_masking=document_masking, reset_position_ids=reset_position_ids
    )(packed_rows())
    packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    input_ids = batch["input_ids"]
    alone = {
        (row, start): model(input_ids[row : row + 1, start:end], use_cache=False).logits[0]
        for row, start, end in _segments()
    }
    if document_masking:
        # Every document piece computes what it computes alone. Without position resets too: RoPE scores depend
        # only on position differences, which a constant shift inside a document leaves unchanged.
        for row, start, end in _segments():
            torch.testing.assert_close(packed[row, start:end], alone[row, start], atol=1e-5, rtol=1e-5)
        return
    # Unmasked: the rows are attended causally as a whole, with the positions the switch gives...
    reference = _causal_row_logits(model, input_ids, batch["position_ids"])
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=1e-5)
    if not reset_position_ids:
        model.set_attn_implementation(backend)
        torch.testing.assert_close(packed, model(input_ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)
    # ...so a document after the first of its row sees the ones before it.
    for row, start, end in _segments():
        difference = (packed[row, start:end] - alone[row, start]).abs().max().item()
        assert (difference > 1e-2) == (start > 0), (row, start, difference)


@torch.no_grad()
def test_document_masking_is_the_only_thing_position_resets_leave_unchanged():
    """Unmasked, restarting positions change what a later document computes (other distances to the earlier
    tokens); masked, they change nothing beyond rounding."""
    model = _model("sdpa")
    logits = {}
    for document_masking, reset_position_ids in SWITCHES:
        collator = PackedBatchCollator(
            goldfish_k=None, document_masking=document_masking, reset_position_ids=reset_position_ids
        )
        batch = collator(packed_rows())
        logits[document_masking, reset_position_ids] = model(
            **{k: v for k, v in batch.items() if k != "labels"}, use_cache=False
        ).logits
    torch.testing.assert_close(logits[True, True], logits[True, False], atol=1e-5, rtol=1e-5)
    assert (logits[False, True] - logits[False, False]).abs().max().item() > 1e-2


CUDA_BACKENDS = ["flex_attention"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.cuda
@torch.no_grad()
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize(("document_masking", "reset_position_ids"), SWITCHES, ids=SWITCH_IDS)
def test_gpu_backends_compute_what_eager_computes_for_each_switch(backend, document_masking, reset_position_ids):
    model = _model("eager").to("cuda", torch.bfloat16)
    batch = PackedBatchCollator(
        goldfish_k=None, document_masking=document_masking, reset_position_ids=reset_position_ids
    )(packed_rows())
    inputs = {k: v.cuda() for k, v in batch.items() if k != "labels"}
    expected = model(**inputs, use_cache=False).logits.float()
    model.set_attn_implementation(backend)
    assert (model(**inputs, use_cache=False).logits.float() - expected).abs().max().item() < 0.05


def varlen_reference_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None, **kwargs
):
    """What FlashAttention computes in `transformers` for a batch without padding: with `cu_seq_lens_q`, causal
    attention inside each [cu[i], cu[i+1]) of the flattened batch (the variable-length kernel); without, each row
    causally as a whole (the kernel for a batch of more than one row, whatever its position ids)."""
    batch, heads, length, head_dim = query.shape
    key, value = (repeat_kv(states, heads // states.shape[1]) for states in (key, value))
    flat = [states.transpose(1, 2).reshape(batch * length, heads, head_dim) for states in (query, key, value)]
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.arange(0, batch * length + 1, length)
    output = torch.empty_like(flat[0])
    for start, end in zip(cu_seq_lens_q[:-1].tolist(), cu_seq_lens_q[1:].tolist(), strict=True):
        q, k, v = (states[start:end].transpose(0, 1) for states in flat)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        output[start:end] = attended.transpose(0, 1)
    return output.reshape(batch, length, heads, head_dim), None


@pytest.fixture
def flash_reference_backend():
    """A backend whose name says "flash" (so the model treats it as FlashAttention) computing what FlashAttention
    computes, on the CPU."""
    name = "flash_varlen_reference"
    AttentionInterface.register(name, varlen_reference_attention)
    AttentionMaskInterface.register(name, flash_attention_mask)
    yield name
    del AttentionInterface._global_mapping[name]
    del AttentionMaskInterface._global_mapping[name]


@torch.no_grad()
@pytest.mark.parametrize(("document_masking", "reset_position_ids"), SWITCHES, ids=SWITCH_IDS)
def test_flash_attention_gets_the_documents_as_variable_length_sequences(
    flash_reference_backend, document_masking, reset_position_ids
):
    model = _model("sdpa")
    batch = PackedBatchCollator(
        goldfish_k=None, document_masking=document_masking, reset_position_ids=reset_position_ids
    )(packed_rows())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected = model(**inputs, use_cache=False).logits
    # Set directly: set_attn_implementation would look for a flash-attn kernel for a name that says "flash".
    model.config._attn_implementation = flash_reference_backend
    torch.testing.assert_close(model(**inputs, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)
    if document_masking:
        # Without seq_idx a batch of two rows runs FlashAttention's plain causal kernel across the documents.
        unmasked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        assert (unmasked - expected).abs().max().item() > 1e-2


def test_flash_attention_document_kwargs_are_cumulative_lengths_over_the_flattened_batch():
    seq_idx = torch.tensor(DOCUMENTS)
    kwargs = flash_attention_document_kwargs(seq_idx)
    assert kwargs["cu_seq_lens_q"].tolist() == kwargs["cu_seq_lens_k"].tolist() == [0, 6, 12, 15, 20, 24]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert int(kwargs["max_length_q"]) == int(kwargs["max_length_k"]) == 6
    # One row: what `transformers` derives from restarting position ids.
    position_ids = torch.tensor([PACKED_POSITIONS[1]])
    (cu_seq_lens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(position_ids)
    row = flash_attention_document_kwargs(torch.tensor([DOCUMENTS[1]]))
    assert row["cu_seq_lens_q"].tolist() == cu_seq_lens.tolist() and int(row["max_length_q"]) == int(max_length)


def test_seq_idx_cannot_continue_a_cache():
    model = _model("sdpa")
    input_ids = torch.randint(4, 256, (1, 8))
    cache = model(input_ids, use_cache=True).cache
    with pytest.raises(ValueError, match="the cache already holds 8 tokens; pass seq_idx without a cache"):
        model(input_ids[:, :2], cache=cache, seq_idx=torch.zeros(1, 2, dtype=torch.long))
