"""The global row order: what a step consumes depends on the rows consumed before it, never on the processes."""

from __future__ import annotations

import itertools

import datasets
import pytest

from apertus_hf.data import GlobalRowSampler, GlobalRowStream
from apertus_hf.data.global_rows import RowPermutation


def rows_of_steps(read, global_batches: list[int], num_processes: int, start: int = 0) -> list[list[int]]:
    """The rows each step consumes over all processes, read by `num_processes` readers from global position `start`:
    read(process_index, start) -> iterator over that process's rows."""
    readers = [read(process, start) for process in range(num_processes)]
    steps = []
    for global_batch in global_batches:
        per_process = [list(itertools.islice(reader, global_batch // num_processes)) for reader in readers]
        steps.append(sorted(row for rows in per_process for row in rows))
    return steps


def sampler_reader(num_rows: int, seed: int, num_processes: int, micro_batch_rows: int = 1):
    return lambda process, start: iter(
        GlobalRowSampler(num_rows, seed, start, process, num_processes, micro_batch_rows)
    )


@pytest.mark.parametrize("num_rows", [7, 24, 25])
def test_every_process_count_consumes_the_same_rows_at_every_step_across_epochs(num_rows):
    batches = [4, 4, 8, 8, 8, 8, 16, 16]  # a batch ramp; 72 rows cross several epochs, some mid-step
    expected = rows_of_steps(sampler_reader(num_rows, 3, 1), batches, 1)
    for processes in (2, 4):
        assert rows_of_steps(sampler_reader(num_rows, 3, processes), batches, processes) == expected


def test_each_micro_batch_holds_the_same_rows_whatever_the_number_of_processes():
    """Megatron's dealing: micro-batches of b consecutive rows of the global order, every P-th to a process; so a loss
    averaged per micro-batch is the same on any number of processes."""

    def micro_batches(num_processes: int) -> list[set[frozenset[int]]]:
        readers = [
            iter(GlobalRowSampler(13, 3, 0, process, num_processes, micro_batch_rows=2))
            for process in range(num_processes)
        ]
        steps = []
        for _ in range(5):  # steps of 8 rows: 4 micro-batches of 2
            per_step = set()
            for _ in range(4 // num_processes):
                for reader in readers:
                    per_step.add(frozenset(itertools.islice(reader, 2)))
            steps.append(per_step)
        return steps

    assert micro_batches(1) == micro_batches(2) == micro_batches(4)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (4, 2), (1, 4)])
def test_a_resume_on_another_process_count_continues_the_stream_without_repeating_or_skipping(before, after):
    num_rows, batches = 25, [4, 8, 8, 8, 16, 16]
    uninterrupted = rows_of_steps(sampler_reader(num_rows, 5, before), batches, before)
    stop = 3
    consumed = sum(batches[:stop])
    resumed = rows_of_steps(sampler_reader(num_rows, 5, after), batches[stop:], after, start=consumed)
    assert resumed == uninterrupted[stop:]


def test_each_epoch_is_a_permutation_of_every_row_seeded_by_seed_plus_epoch():
    sampler = GlobalRowSampler(10, seed=7, start=0, process_index=0, num_processes=1)
    stream = list(itertools.islice(iter(sampler), 30))
    epochs = [stream[i : i + 10] for i in (0, 10, 20)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    next_seed = GlobalRowSampler(10, seed=8, start=0, process_index=0, num_processes=1).epoch_order(0)
    assert epochs[1] == [next_seed[row] for row in range(10)]
    unshuffled = GlobalRowSampler(4, 0, 0, 0, 1, shuffle=False)
    assert list(itertools.islice(iter(unshuffled), 6)) == [0, 1, 2, 3, 0, 1]


def test_a_stream_reads_the_same_global_order_and_resumes_at_a_global_position():
    rows = datasets.Dataset.from_dict({"row": list(range(9))}).to_iterable_dataset(num_shards=3).shuffle(seed=2)

    def read(processes):
        return lambda process, start: (item["row"] for item in GlobalRowStream(rows, start, process, processes, 2))

    batches = [4, 8, 4, 4, 8]  # global batches are whole micro-batches of 2 rows on every process
    expected = rows_of_steps(read(1), batches, 1)
    assert rows_of_steps(read(2), batches, 2) == expected
    assert rows_of_steps(read(2), batches[2:], 2, start=12) == expected[2:]
    # Epochs reshuffle (IterableDataset.set_epoch) and each holds every row once.
    flat = list(itertools.islice(read(1)(0, 0), 18))
    assert sorted(flat[:9]) == sorted(flat[9:]) == list(range(9)) and flat[:9] != flat[9:]


def test_bad_positions_and_empty_data_are_refused():
    with pytest.raises(ValueError, match="no packed row"):
        GlobalRowSampler(0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="process_index"):
        GlobalRowSampler(4, 0, 0, 2, 2)
    with pytest.raises(ValueError, match="start position"):
        GlobalRowSampler(4, 0, -1, 0, 1)
    with pytest.raises(ValueError, match="micro_batch_rows"):
        GlobalRowSampler(4, 0, 0, 0, 1, micro_batch_rows=0)
    empty = datasets.IterableDataset.from_generator(
        lambda: iter(()), features=datasets.Features({"row": datasets.Value("int64")})
    )
    with pytest.raises(ValueError, match="yields no packed row"):
        next(iter(GlobalRowStream(empty, 0, 0, 1)))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_the_row_permutation_is_a_permutation_of_every_size_and_depends_on_its_key(size):
    order = [RowPermutation(size, key=11)[index] for index in range(size)]
    assert sorted(order) == list(range(size))
    if size >= 16:
        assert order != list(range(size))
        assert order != [RowPermutation(size, key=12)[index] for index in range(size)]


def test_the_row_permutation_of_billions_of_rows_costs_no_memory_and_spreads_neighbours():
    size = 3_662_109_375  # the samples of Apertus-8B's run
    permutation = RowPermutation(size, key=28)
    first = [permutation[index] for index in range(2000)]
    assert len(set(first)) == 2000 and all(0 <= row < size for row in first)
    # Consecutive positions land all over the range: about uniform over its tenths.
    tenths = [sum(1 for row in first if row * 10 // size == tenth) for tenth in range(10)]
    assert min(tenths) > 140, tenths
    with pytest.raises(IndexError):
        permutation[size]
