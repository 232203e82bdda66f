"""TrainBatchSampler: coverage, determinism, length grouping, resume and data-parallel slicing."""

import pytest
import torch

from kdqa.samplers import TrainBatchSampler


def _lengths(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # SQuAD-like: most features short, a tail of full-length windows.
    lengths = torch.randint(40, 250, (n,), generator=g)
    lengths[torch.rand(n, generator=g) < 0.2] = 384
    return lengths


def _epoch(sampler, epoch, start_batch=0):
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


def _padding_waste(batches, lengths):
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("n,batch_size", [(1000, 16), (1003, 16), (7, 16)])
def test_every_feature_once_per_epoch(n, batch_size, group_by_length):
    sampler = TrainBatchSampler(n, batch_size, lengths=_lengths(n), group_by_length=group_by_length, seed=3)
    for epoch in range(2):
        batches = _epoch(sampler, epoch)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert len(batches) == len(sampler) == -(-n // batch_size)
        assert all(len(b) == batch_size for b in batches[:-1])


@pytest.mark.parametrize("group_by_length", [False, True])
def test_deterministic_per_seed_and_different_across_epochs(group_by_length):
    n, lengths = 500, _lengths(500)

    def make(seed):
        return TrainBatchSampler(n, 8, lengths=lengths, group_by_length=group_by_length, seed=seed)

    assert _epoch(make(1), 0) == _epoch(make(1), 0)
    assert _epoch(make(1), 1) == _epoch(make(1), 1)
    assert _epoch(make(1), 0) != _epoch(make(1), 1)
    assert _epoch(make(1), 0) != _epoch(make(2), 0)


def test_global_rng_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _epoch(TrainBatchSampler(100, 8, lengths=_lengths(100), group_by_length=True), 0)
    assert torch.equal(torch.rand(3), expected)


def test_no_shuffle_keeps_index_order():
    sampler = TrainBatchSampler(10, 4, shuffle=False)
    assert _epoch(sampler, 0) == _epoch(sampler, 5) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    sorted_sampler = TrainBatchSampler(5, 2, lengths=[3, 9, 1, 9, 5], shuffle=False, group_by_length=True)
    assert _epoch(sorted_sampler, 0) == [[1, 3], [4, 0], [2]]


def test_group_by_length_cuts_padding_waste():
    n, batch_size = 4000, 32
    lengths = _lengths(n, seed=1)
    random_batches = _epoch(TrainBatchSampler(n, batch_size, seed=0), 0)
    grouped = TrainBatchSampler(n, batch_size, lengths=lengths, group_by_length=True, seed=0)
    grouped_batches = _epoch(grouped, 0)
    waste_random = _padding_waste(random_batches, lengths)
    waste_grouped = _padding_waste(grouped_batches, lengths)
    assert waste_grouped < 0.1 * waste_random, (waste_grouped, waste_random)
    # The longest feature's batch comes first, so running out of memory shows in step one.
    assert int(lengths[grouped_batches[0]].max()) == int(lengths.max())
    # Batch order is shuffled: lengths of consecutive batches are not sorted.
    maxima = [int(lengths[b].max()) for b in grouped_batches]
    assert maxima != sorted(maxima, reverse=True)


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("num_replicas,rank", [(1, 0), (2, 1)])
def test_start_batch_resumes_with_the_tail_of_the_same_order(group_by_length, num_replicas, rank):
    sampler = TrainBatchSampler(
        301, 8, lengths=_lengths(301), group_by_length=group_by_length, seed=5, num_replicas=num_replicas, rank=rank
    )
    full = _epoch(sampler, 2)
    resumed = _epoch(sampler, 2, start_batch=7)
    assert resumed == full[7:]
    assert len(sampler) == len(full)
    assert list(sampler) == full[7:]  # the skip holds until the next set_epoch
    assert _epoch(sampler, 2) == full
    assert _epoch(sampler, 2, start_batch=len(full)) == []


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("n", [640, 333])
def test_replica_slices_concatenate_to_the_single_process_batch(group_by_length, n):
    """2 ranks x batch 4 see exactly what 1 process with batch 8 sees, step for step."""
    lengths = _lengths(n)
    kwargs = dict(lengths=lengths, group_by_length=group_by_length, seed=11)
    single = _epoch(TrainBatchSampler(n, 8, **kwargs), 1)
    ranks = [_epoch(TrainBatchSampler(n, 4, num_replicas=2, rank=r, **kwargs), 1) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    full_steps = len(single) if n % 8 == 0 else len(single) - 1
    for step in range(full_steps):
        assert ranks[0][step] + ranks[1][step] == single[step]
    if full_steps < len(single):  # the padded last step starts with the single process's short batch
        last = ranks[0][-1] + ranks[1][-1]
        assert last[: len(single[-1])] == single[-1] and len(last) == 8


def test_uneven_tail_is_padded_by_wrapping_around_with_replicas():
    n = 10  # global batch 2 * 4 = 8: the second global batch has 2 real features and 6 wrapped
    ranks = [_epoch(TrainBatchSampler(n, 4, shuffle=False, num_replicas=2, rank=r), 0) for r in range(2)]
    assert ranks[0] == [[0, 1, 2, 3], [8, 9, 0, 1]]
    assert ranks[1] == [[4, 5, 6, 7], [2, 3, 4, 5]]
    # Fewer features than one global batch: wrap as often as needed.
    tiny = [_epoch(TrainBatchSampler(3, 4, shuffle=False, num_replicas=2, rank=r), 0) for r in range(2)]
    assert tiny == [[[0, 1, 2, 0]], [[1, 2, 0, 1]]]
    # Shuffled and grouped: every feature still covered, every rank the same count of full batches.
    for group in (False, True):
        per_rank = [
            _epoch(TrainBatchSampler(37, 4, lengths=_lengths(37), group_by_length=group, num_replicas=3, rank=r), 0)
            for r in range(3)
        ]
        assert len({len(batches) for batches in per_rank}) == 1
        assert all(len(b) == 4 for batches in per_rank for b in batches)
        assert {i for batches in per_rank for b in batches for i in b} == set(range(37))


def test_drop_last():
    sampler = TrainBatchSampler(10, 4, shuffle=False, num_replicas=2, rank=1, drop_last=True)
    assert len(sampler) == 1 and _epoch(sampler, 0) == [[4, 5, 6, 7]]
    single = TrainBatchSampler(10, 4, lengths=_lengths(10), group_by_length=True, drop_last=True)
    batches = _epoch(single, 0)
    assert len(batches) == len(single) == 2 and all(len(b) == 4 for b in batches)


def test_works_as_dataloader_batch_sampler():
    data = torch.arange(20)
    sampler = TrainBatchSampler(20, 6, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    sampler.set_epoch(0)
    assert sorted(torch.cat(list(loader)).tolist()) == list(range(20))
    assert len(loader) == 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_samples=10, batch_size=0), "batch_size"),
        (dict(num_samples=-1, batch_size=4), "num_samples"),
        (dict(num_samples=10, batch_size=4, num_replicas=0), "num_replicas"),
        (dict(num_samples=10, batch_size=4, num_replicas=2, rank=2), "rank"),
        (dict(num_samples=10, batch_size=4, rank=-1), "rank"),
        (dict(num_samples=10, batch_size=4, lengths=[1, 2, 3]), "lengths has 3 entries"),
        (dict(num_samples=10, batch_size=4, group_by_length=True), "needs lengths"),
    ],
)
def test_bad_arguments(kwargs, match):
    n, b = kwargs.pop("num_samples"), kwargs.pop("batch_size")
    with pytest.raises(ValueError, match=match):
        TrainBatchSampler(n, b, **kwargs)


def test_bad_start_batch():
    sampler = TrainBatchSampler(10, 4)
    with pytest.raises(ValueError, match="start_batch"):
        sampler.set_epoch(0, start_batch=4)
