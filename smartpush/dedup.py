"""Duplicate recipient ids across millions of rows, in bounded memory."""

from __future__ import annotations

from array import array

__all__ = ["SeenIds"]


class SeenIds:
    """Duplicate detection for millions of recipient ids in bounded memory.

    Keeps a 64-bit hash of each id (Python's ``hash`` of the string, 0 reserved as "empty") with the
    line of its first occurrence, in an open-addressing table (linear probing) backed by
    ``array('Q')`` + ``array('I')`` (lines up to 2**32 - 1), doubled when half full: 12 bytes a slot,
    so 24-48 bytes per id, plus the old table while doubling (1,000,000 ids: 2**21 slots, 25 MB).

    The ids themselves are not kept. Two different ids collide with probability about n²/2⁶⁵ for n ids
    (about 3 × 10⁻⁸ for a million): such an id would be reported as a duplicate of the other. ``hash``
    is salted per process, so a table is only meaningful within one process.
    """

    __slots__ = ("_count", "_keys", "_lines", "_mask")

    def __init__(self, capacity: int = 1 << 16) -> None:
        size = 1 << max(4, (max(capacity, 1) * 2 - 1).bit_length())
        self._keys = array("Q", [0]) * size
        self._lines = array("I", [0]) * size
        self._mask = size - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @staticmethod
    def key(recipient_id: str) -> int:
        """The 64-bit key kept for ``recipient_id`` (the same in a process and the processes it forks)."""
        return hash(recipient_id) & 0xFFFF_FFFF_FFFF_FFFF or 1

    def add(self, recipient_id: str, line: int) -> int | None:
        """Record ``recipient_id``; return the line of its earlier occurrence if already seen, else None."""
        return self.add_key(hash(recipient_id) & 0xFFFF_FFFF_FFFF_FFFF or 1, line)

    def add_key(self, h: int, line: int) -> int | None:
        """:meth:`add` for a key already computed with :meth:`key`."""
        keys = self._keys
        mask = self._mask
        i = h & mask
        while True:
            k = keys[i]
            if k == 0:
                break
            if k == h:
                return self._lines[i]
            i = (i + 1) & mask
        keys[i] = h
        self._lines[i] = line
        self._count += 1
        if self._count * 2 > mask:
            self._grow()
        return None

    def _grow(self) -> None:
        old_keys, old_lines = self._keys, self._lines
        size = (self._mask + 1) * 2
        keys = array("Q", [0]) * size
        lines = array("I", [0]) * size
        mask = size - 1
        for j, h in enumerate(old_keys):
            if h:
                i = h & mask
                while keys[i]:
                    i = (i + 1) & mask
                keys[i] = h
                lines[i] = old_lines[j]
        self._keys, self._lines, self._mask = keys, lines, mask
