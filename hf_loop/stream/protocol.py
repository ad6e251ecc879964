"""The protocol between a bound stream's readers (DataLoader workers, or the main process) and the tracker in the
main process: what kind of item a reader sends, and the reader's position after it.

``reader.py`` produces these and ``tracker.py`` consumes them; neither imports the other.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class Kind(IntEnum):
    """What a reader sends: a full collated batch, its short last batch (columns, merged with the other readers'
    tails in the main process), or the end of its pass."""

    BATCH = 0
    TAIL = 1
    END = 2


class ReaderPosition(NamedTuple):
    """Where a reader resumes: the window, then per source the (piece index, row offset in its shard) where that
    window starts, and how many of the window's batches were already yielded.

    Travels as flat ints (:meth:`flat`): through the shared-memory tensor that reaches the workers, and in saved
    states.

    Example:
        >>> p = ReaderPosition(3, ((1, 40),), 2)
        >>> p.flat(), ReaderPosition.from_flat(p.flat()) == p
        ((3, 1, 40, 2), True)
    """

    window: int
    sources: tuple[tuple[int, int], ...]
    batch: int

    @staticmethod
    def size(sources: int) -> int:
        """Ints in the flat form for ``sources`` mixed sources."""
        return 2 + 2 * sources

    @classmethod
    def start(cls, sources: int) -> ReaderPosition:
        """The beginning of a pass."""
        return cls(0, ((0, 0),) * sources, 0)

    @classmethod
    def from_flat(cls, values: tuple[int, ...] | list[int]) -> ReaderPosition:
        values = [int(v) for v in values]
        middle = values[1:-1]
        return cls(values[0], tuple(zip(middle[0::2], middle[1::2])), values[-1])

    def flat(self) -> tuple[int, ...]:
        return (self.window, *(v for pair in self.sources for v in pair), self.batch)


class Meta(NamedTuple):
    """What travels with each item from a reader: which local reader sent it, for which epoch, what it is, how many
    examples it holds, and (for a batch) the reader's position after it, flat."""

    reader: int
    epoch: int
    kind: Kind
    rows: int = 0
    position: tuple[int, ...] = ()
