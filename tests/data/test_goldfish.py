import subprocess
import sys

import pytest
import torch

from apertus_hf.data import IGNORE_INDEX, PackedBatchCollator, apply_goldfish, goldfish_drop_mask, pack_token_ids
from apertus_hf.data.goldfish import GOLDFISH_TABLE_SIZE, _context_keys, _hash_table

M = 1_000_003
VOCAB = 131072  # the Apertus tokenizer's vocabulary size


def wrap_int64(value: int) -> int:
    """Python int -> the value C int64 arithmetic would hold (two's-complement wrap-around)."""
    return ((value + 2**63) % 2**64) - 2**63


@pytest.fixture(scope="module")
def table() -> list[float]:
    # Built here from the documented definition, not taken from the module, so the comparison also checks it.
    generator = torch.Generator().manual_seed(2971215073)
    return torch.rand(1_000_003, generator=generator).tolist()


def reference_mask(labels: torch.Tensor, k: int, h: int, table: list[float]) -> torch.Tensor:
    """The spec as a plain loop over Python ints: wrapped int64 product of the h ids, then a floor modulo."""
    rows = labels.reshape(-1, labels.shape[-1]).tolist()
    out = []
    for row in rows:
        decisions = [False] * len(row)
        for t in range(h - 1, len(row)):
            product = 1
            for token in row[t - h + 1 : t + 1]:
                product = wrap_int64(product * token)
            decisions[t] = table[product % M] < 1 / k and row[t] != -100
        out.append(decisions)
    return torch.tensor(out, dtype=torch.bool).reshape(labels.shape)


def random_labels(shape, vocab, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_hash_table_is_the_documented_table_and_is_cached():
    generator = torch.Generator().manual_seed(2971215073)
    expected = torch.rand(1_000_003, generator=generator)
    cpu = torch.device("cpu")
    assert GOLDFISH_TABLE_SIZE == M
    assert _hash_table(cpu).dtype == torch.float32
    assert torch.equal(_hash_table(cpu), expected)
    assert _hash_table(cpu) is _hash_table(cpu)


def test_torch_prod_on_int64_wraps_like_c():
    values = torch.randint(-(2**62), 2**62, (200, 7), generator=torch.Generator().manual_seed(3))
    products = torch.prod(values, dim=-1).tolist()
    for row, product in zip(values.tolist(), products, strict=True):
        expected = 1
        for value in row:
            expected = wrap_int64(expected * value)
        assert product == expected


@pytest.mark.parametrize(
    ("ids", "expected_key"),
    [
        ([2] * 64, 0),  # 2**64 wraps to 0
        ([2] * 63, (-(2**63)) % M),  # 2**63 wraps to -2**63; the floor modulo makes its key non-negative
        ([-1, 3], M - 3),  # negative products (e.g. with -100 ids) land in [0, M) too
        # 2**80 wraps to 0; reducing modulo M after every factor would give (2**40 % M) ** 2 % M != 0 instead.
        ([2**40, 2**40], 0),
        ([VOCAB - 1, VOCAB - 2, VOCAB - 3], ((VOCAB - 1) * (VOCAB - 2) * (VOCAB - 3)) % M),  # no overflow
    ],
)
def test_context_key_is_the_wrapped_product_modulo_the_table_size(ids, expected_key):
    keys = _context_keys(torch.tensor(ids), len(ids))
    assert keys.tolist() == [expected_key]


@pytest.mark.parametrize("k", [2, 50])
@pytest.mark.parametrize("h", [1, 3, 50])
@pytest.mark.parametrize(
    ("shape", "vocab"),
    [((300,), VOCAB), ((4, 300), VOCAB), ((3, 300), 7), ((2, 60), 50_000)],
)
def test_matches_reference_loop(shape, vocab, k, h, table):
    labels = random_labels(shape, vocab, seed=sum(shape) + vocab + h)
    labels[..., ::37] = -100  # ignored targets take part in the products of their neighbours
    mask = goldfish_drop_mask(labels, k=k, h=h)
    assert mask.shape == labels.shape and mask.dtype == torch.bool
    assert torch.equal(mask, reference_mask(labels, k, h, table))


def test_drop_rate_is_about_one_over_k():
    # h=3 keeps the products of ids below 2**51, so they never overflow and their keys spread over the whole table.
    # (With h=50 about a tenth of random windows hold >= 64 factors of two, wrap to 0 and share key 0, which the
    # table keeps: that variant drops fewer than 1/k of random targets, as the hash-table recipe defines it.)
    k, h = 50, 3
    # The table's own share of values below 1/k (compared in float32, as the mask does) is a binomial draw of
    # 1,000,003 values around 1/k: 0.019901, -0.71 standard errors (SE 0.00014) from 0.02.
    table_share = (_hash_table(torch.device("cpu")) < 1 / k).double().mean().item()
    table_se = (1 / k * (1 - 1 / k) / M) ** 0.5
    assert abs(table_share - 1 / k) < 4 * table_se, (table_share, table_se)
    # Keys spread uniformly over the table drop each target with probability table_share, so the number dropped is
    # binomial: 4,000,000 targets give an SE of sqrt(p (1 - p) / n) = 0.00007. Seen: 0.0199805, +1.1 SE. Within
    # 4 SE fails a correct mask with probability 6e-5, and a mask dropping at 1/(k - 1) (+7.3 SE) or 1/(k + 1)
    # (-4.3 SE) on these labels fails; the old 200,000 targets and a fixed +-0.002 (6 SE) let both of those through.
    labels = random_labels((1000, 4002), VOCAB, seed=0)
    dropped = goldfish_drop_mask(labels, k=k, h=h)[:, h - 1 :]
    rate = dropped.double().mean().item()
    standard_error = (table_share * (1 - table_share) / dropped.numel()) ** 0.5
    assert abs(rate - table_share) < 4 * standard_error, (rate, table_share, standard_error)


@pytest.mark.parametrize("h", [3, 50])
def test_first_h_minus_1_targets_are_never_dropped(h):
    labels = random_labels((64, 200), VOCAB, seed=1)
    mask = goldfish_drop_mask(labels, k=2, h=h)
    assert not mask[:, : h - 1].any()
    assert mask[:, h - 1 :].any()


def test_rows_shorter_than_h_drop_nothing():
    labels = random_labels((3, 49), VOCAB, seed=2)
    assert not goldfish_drop_mask(labels, k=1, h=50).any()


def test_k_1_drops_every_target_with_a_full_context():
    labels = random_labels((2, 20), VOCAB, seed=2)
    mask = goldfish_drop_mask(labels, k=1, h=4)
    assert not mask[:, :3].any() and mask[:, 3:].all()


def test_repeated_passage_loses_the_same_tokens():
    h = 13
    passage = random_labels((150,), VOCAB, seed=4)
    labels = random_labels((3, 400), VOCAB, seed=5)
    offsets = [(0, 0), (1, 17), (2, 250)]
    for row, start in offsets:
        labels[row, start : start + 150] = passage
    mask = goldfish_drop_mask(labels, k=4, h=h)
    # From its h-th token on, a target's context lies inside the passage, wherever the passage is.
    decisions = [mask[row, start + h - 1 : start + 150] for row, start in offsets]
    assert decisions[0].any()
    assert torch.equal(decisions[0], decisions[1]) and torch.equal(decisions[0], decisions[2])
    assert torch.equal(decisions[0], goldfish_drop_mask(passage, k=4, h=h)[h - 1 :])


def test_same_decisions_in_a_fresh_process():
    script = (
        "import torch; from apertus_hf.data import goldfish_drop_mask; "
        "labels = torch.randint(0, 131072, (4, 500), generator=torch.Generator().manual_seed(6)); "
        "print(goldfish_drop_mask(labels, k=5, h=50).nonzero().tolist())"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    labels = random_labels((4, 500), VOCAB, seed=6)
    here = goldfish_drop_mask(labels, k=5, h=50).nonzero().tolist()
    assert here  # a non-trivial mask, so that agreeing means something
    assert result.stdout.strip() == str(here)


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_ignored_targets_are_never_dropped(ignore_index):
    labels = random_labels((4, 100), VOCAB, seed=7)
    ignored = torch.rand(labels.shape, generator=torch.Generator().manual_seed(8)) < 0.3
    labels[ignored] = ignore_index
    mask = goldfish_drop_mask(labels, k=1, h=3, ignore_index=ignore_index)  # k=1 would drop every other target
    assert not mask[ignored].any()
    assert mask[:, 2:][~ignored[:, 2:]].all()


def test_accepts_other_integer_dtypes():
    labels = random_labels((2, 300), VOCAB, seed=9)
    assert torch.equal(goldfish_drop_mask(labels.int(), k=3, h=50), goldfish_drop_mask(labels, k=3, h=50))


@pytest.mark.parametrize(
    ("labels", "k", "h", "error", "message"),
    [
        (torch.zeros(10), 50, 50, TypeError, "integer token ids"),
        (torch.zeros(10, dtype=torch.bool), 50, 50, TypeError, "integer token ids"),
        ([1, 2, 3], 50, 50, TypeError, "torch.Tensor"),
        (torch.tensor(3), 50, 50, ValueError, "0-dimensional"),
        (torch.zeros(10, dtype=torch.long), 0, 50, ValueError, "k must be >= 1"),
        (torch.zeros(10, dtype=torch.long), 50, 0, ValueError, "h must be >= 1"),
        (torch.zeros(10, dtype=torch.long), 0.5, 50, TypeError, "k must be an int"),
        (torch.zeros(10, dtype=torch.long), 50, True, TypeError, "h must be an int"),
    ],
)
def test_rejects_invalid_arguments(labels, k, h, error, message):
    with pytest.raises(error, match=message):
        goldfish_drop_mask(labels, k=k, h=h)


def test_apply_goldfish_ignores_exactly_the_dropped_targets():
    labels = random_labels((4, 300), VOCAB, seed=10)
    labels[:, :5] = -100
    original = labels.clone()
    masked = apply_goldfish(labels, k=3, h=50)
    mask = goldfish_drop_mask(labels, k=3, h=50)
    assert mask.any()
    assert torch.equal(labels, original)  # the input is left alone
    assert (masked[mask] == -100).all()
    assert torch.equal(masked[~mask], labels[~mask])


BOS, EOS, PAD = 1, 2, 3  # the Apertus tokenizer's <s>, </s> and <pad>


@pytest.fixture(scope="module")
def packed_documents() -> tuple[list[list[int]], dict[str, torch.Tensor], int]:
    """20 documents of 10..200 ids packed into rows of 512, the last row ending in padding."""
    generator = torch.Generator().manual_seed(12)
    lengths = torch.randint(10, 200, (20,), generator=generator).tolist()
    documents = [torch.randint(4, VOCAB, (length,), generator=generator).tolist() for length in lengths]
    seq_len = 512
    rows = pack_token_ids(documents, seq_len, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    columns = {name: torch.from_numpy(array).long() for name, array in rows.items()}
    assert columns["input_ids"][-1, -1] == PAD  # the padding is part of what is compared
    return documents, columns, seq_len


def megatron_raw_label_rows(documents: list[list[int]], seq_len: int) -> list[list[int]]:
    """The label rows swiss-ai/Megatron-LM hashes: `<s> doc </s>` back to back, padding 0 (SPEC section 3).

    Built from the documents, not from the packed rows. Our labels are not shifted (the model shifts them), so a
    row's raw labels are its token ids.
    """
    stream = [token for ids in documents for token in (BOS, *ids, EOS)]
    stream += [0] * (-len(stream) % seq_len)
    return [stream[start : start + seq_len] for start in range(0, len(stream), seq_len)]


def megatron_drops(raw_labels: list[int], loss_mask: list[bool], k: int, h: int, table: list[float]) -> list[bool]:
    """Megatron's `apply_goldfish` (megatron/core/datasets/gpt_dataset.py) on one row of raw label ids, then its
    loss mask: the wrapped int64 product of the h ids ending at t, a floor modulo of the table size, and
    table[key] < 1/k compared in float32 (the dtype of its table); targets t < h - 1 are never dropped."""
    threshold = torch.tensor(1 / k, dtype=torch.float32).item()
    drops = [False] * len(raw_labels)
    for t in range(h - 1, len(raw_labels)):
        product = 1
        for token in raw_labels[t - h + 1 : t + 1]:
            product = wrap_int64(product * token)
        drops[t] = table[product % M] < threshold and loss_mask[t]
    return drops


def test_packed_rows_get_megatrons_drops_bit_for_bit(packed_documents, table):
    k, h = 50, 50
    documents, columns, seq_len = packed_documents
    rows = [{name: column[i].numpy() for name, column in columns.items()} for i in range(len(columns["labels"]))]
    labels = PackedBatchCollator(goldfish_k=k, goldfish_h=h)(rows)["labels"]
    dropped = (labels == IGNORE_INDEX) & (columns["labels"] != IGNORE_INDEX)
    raw_rows = megatron_raw_label_rows(documents, seq_len)
    # Megatron's loss mask: --eod-mask-loss removes the <s> after every </s>, and padding is masked.
    loss_masks = [[token not in (BOS, 0) for token in row] for row in raw_rows]
    expected = torch.tensor([megatron_drops(r, m, k, h, table) for r, m in zip(raw_rows, loss_masks, strict=True)])
    assert torch.equal(dropped, expected)
    # The comparison covers the contexts that hold a document start: drops among the h - 1 targets after one.
    starts = (columns["input_ids"] == BOS).nonzero().tolist()
    assert sum(expected[row, start + 1 : start + h].sum().item() for row, start in starts) >= 5


def test_hashing_ignore_index_at_document_starts_gives_other_drops(packed_documents):
    # The previous definition hashed the labels as given, -100 at every document start and at the padding.
    k, h = 50, 50
    _, columns, _ = packed_documents
    labels, input_ids = columns["labels"], columns["input_ids"]
    megatron = goldfish_drop_mask(labels, k, h, unmasked_labels=input_ids)
    hashing_ignore_index = goldfish_drop_mask(labels, k, h)
    differences = (megatron != hashing_ignore_index).nonzero().tolist()
    assert len(differences) >= 5
    # They are the decisions whose context of h ids holds a document start, and no others.
    for row, t in differences:
        assert (input_ids[row, max(t - h + 1, 0) : t + 1] == BOS).any(), (row, t)


def test_unmasked_labels_decide_and_labels_only_mask():
    h = 4
    unmasked = random_labels((3, 80), VOCAB, seed=13)
    labels = unmasked.clone()
    labels[:, ::9] = IGNORE_INDEX
    mask = goldfish_drop_mask(labels, k=3, h=h, unmasked_labels=unmasked)
    assert torch.equal(mask, goldfish_drop_mask(unmasked, k=3, h=h) & (labels != IGNORE_INDEX))
    assert torch.equal(apply_goldfish(labels, 3, h, unmasked_labels=unmasked), labels.masked_fill(mask, IGNORE_INDEX))


@pytest.mark.parametrize(
    ("unmasked_labels", "error", "message"),
    [
        (torch.zeros(2, 10), TypeError, "unmasked_labels must hold integer token ids"),
        ([0] * 20, TypeError, "unmasked_labels must be a torch.Tensor"),
        (torch.zeros(2, 11, dtype=torch.long), ValueError, "unmasked_labels must have the shape and device"),
    ],
)
def test_rejects_invalid_unmasked_labels(unmasked_labels, error, message):
    with pytest.raises(error, match=message):
        goldfish_drop_mask(torch.zeros(2, 10, dtype=torch.long), unmasked_labels=unmasked_labels)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    labels = random_labels((8, 4096), VOCAB, seed=11)
    mask = goldfish_drop_mask(labels.cuda(), k=50, h=50)
    assert mask.device.type == "cuda"
    assert torch.equal(mask.cpu(), goldfish_drop_mask(labels, k=50, h=50))
