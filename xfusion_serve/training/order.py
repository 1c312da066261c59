"""The order in which a run visits its records: one definition for every source (in memory, streamed, cached).

A source's records have a natural order: a folder's captions.jsonl lines, a Parquet dataset's rows file by file
(files sorted by name), a WebDataset's samples tar by tar, a latent cache's records as `encode-latents` wrote
them (its source's natural order). Epoch e visits them through a shuffle buffer of `buffer` records seeded by
(seed, e): the buffer fills with the first `buffer` records, then each incoming record takes the place of one
drawn at random, which is yielded; at the end the rest is yielded in a seeded shuffle. With buffer >= N an
epoch is a uniform permutation of the N records; a smaller buffer mixes only records that lie within about
`buffer` of each other (a stream cannot do better without reading everything first). The draws depend on
the positions alone, never on the records, so the permutation of range(N) (`epoch_order`) is exactly the
order a stream of N records comes out in. The run's k-th sample (k = step * batch + index, for one process)
takes the record at position k mod N of epoch k // N.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def shuffled(records: Iterable[T], seed: int, epoch: int, buffer: int) -> Iterator[T]:
    """`records` (one epoch, natural order) in epoch `epoch`'s order; buffer <= 1 keeps the natural order."""
    if buffer <= 1:
        yield from records
        return
    rng = random.Random(f"order:{seed}:{epoch}")
    held: list[T] = []
    for record in records:
        if len(held) < buffer:
            held.append(record)
            continue
        i = rng.randrange(buffer)
        held[i], record = record, held[i]
        yield record
    rng.shuffle(held)
    yield from held


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int, buffer: int) -> tuple[int, ...]:
    """The record indices of epoch `epoch` of n records, in the order `shuffled` gives them."""
    return tuple(shuffled(range(n), seed, epoch, buffer))


def record_at(position: int, n: int, seed: int, buffer: int) -> int:
    """Index of the record at the run's `position` (0-based, over all epochs) among n records."""
    if n < 1:
        raise ValueError("a dataset with no records")
    epoch, k = divmod(position, n)
    return epoch_order(seed, epoch, n, buffer)[k]


def ordered(natural: Callable[[], Iterable[T]], seed: int, buffer: int, start: int = 0,
            epochs: int | None = None) -> Iterator[tuple[int, T]]:
    """(position, record) for every position >= start, epoch after epoch (`epochs` of them, or forever).
    `natural()` -> one pass over the records in their natural order; records before `start` are read and
    dropped (never decoded by the caller); once one pass has counted them, whole epochs before `start` are
    skipped without reading. ValueError: `natural()` yields nothing."""
    position, count, epoch = 0, None, 0
    while epochs is None or epoch < epochs:
        if count is not None and position + count <= start:
            position, epoch = position + count, epoch + 1
            continue
        n = 0
        for record in shuffled(natural(), seed, epoch, buffer):
            if position + n >= start:
                yield position + n, record
            n += 1
        if n == 0:
            raise ValueError("a dataset with no records")
        position, count, epoch = position + n, n, epoch + 1
