"""String document ids <-> FAISS int64 labels, held in numpy arrays (tens of millions of ids).

FAISS only knows int64 labels; an index shard may hold tens of millions of documents, and a
Python ``dict``/``set`` of ``str`` costs about 100 bytes per id (plus GC time). :class:`IdMap`
keeps instead, per label (labels are positions ``0 .. next_label - 1``, consecutive, never
reused):

- the ids' utf-8 bytes back to back (``_data``) and int64 ``_offsets`` (label l is
  ``_data[_offsets[l]:_offsets[l + 1]]``),
- a bool ``_alive`` mask (a removed label keeps its bytes; it is dead),
- for lookups, the live labels sorted by a stable 64-bit hash of the id (blake2b, 8 bytes, over
  utf-8): ``searchsorted`` finds the candidates, and the id's bytes are compared, so a hash
  collision (two ids, one hash) costs a second comparison, never a wrong answer.

About 45 bytes per id at ~20-byte ids. The binary form (:meth:`write` / :meth:`read`, or
:meth:`to_bytes` / :meth:`from_bytes`) streams the arrays, so a snapshot never builds one
blob of them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from whetstone.index.faiss_kinds import AnnInputError

MAGIC = b"WSIDMAP\x01"
# Largest piece handed to a sink at once (a memoryview slice, no copy).
WRITE_BLOCK = 16 << 20


def hash_ids(encoded: Sequence[bytes]) -> np.ndarray:
    """Stable 64-bit hashes (blake2b, 8-byte digest, little-endian) of utf-8 encoded ids, uint64."""
    if not encoded:
        return np.zeros(0, np.uint64)
    digests = b"".join([hashlib.blake2b(item, digest_size=8).digest() for item in encoded])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def encode_ids(ids: Sequence[str], name: str = "ids") -> list[bytes]:
    """utf-8 bytes of each id; refuses non-strings and empty strings, naming the position."""
    try:
        encoded = [doc_id.encode("utf-8") for doc_id in ids]
    except (AttributeError, UnicodeEncodeError):
        position = next(i for i, doc_id in enumerate(ids) if not _encodable(doc_id))
        raise AnnInputError(f"{name}[{position}] must be a non-empty string, got {ids[position]!r}") from None
    if not all(encoded):
        position = next(i for i, item in enumerate(encoded) if not item)
        raise AnnInputError(f"{name}[{position}] must be a non-empty string, got {ids[position]!r}")
    return encoded


def _encodable(doc_id: Any) -> bool:
    try:
        return isinstance(doc_id, str) and bool(doc_id.encode("utf-8"))
    except UnicodeEncodeError:
        return False


def _grow(array: np.ndarray, needed: int) -> np.ndarray:
    """``array`` with capacity for ``needed`` items (x1.5 growth keeps appends amortised O(1))."""
    if needed <= array.shape[0]:
        return array
    out = np.zeros(max(needed, int(array.shape[0] * 1.5) + 16), dtype=array.dtype)
    out[: array.shape[0]] = array
    return out


class IdMap:
    """Label <-> string id over numpy arrays; no per-id Python objects. See the module docstring."""

    def __init__(self) -> None:
        self._data = np.zeros(0, np.uint8)  # capacity-managed; valid [:_nbytes]
        self._nbytes = 0
        self._offsets = np.zeros(1, np.int64)  # valid [:next_label + 1]
        self._alive = np.zeros(0, bool)  # valid [:next_label]
        self._next = 0
        self._live = 0
        self._sorted_hashes = np.zeros(0, np.uint64)  # live labels sorted by the hash of their id
        self._sorted_labels = np.zeros(0, np.int64)

    # ----------------------------------------------------------------- queries
    @property
    def next_label(self) -> int:
        """The label the next added id gets (= every label ever handed out)."""
        return self._next

    def __len__(self) -> int:
        """Live ids."""
        return self._live

    def __repr__(self) -> str:
        return f"IdMap(live={self._live}, next_label={self._next}, bytes={self._nbytes})"

    def nbytes(self) -> int:
        """Bytes held by the arrays (what a shard pays for its ids)."""
        return int(self._nbytes + 8 * (self._next + 1) + self._next + 16 * self._live)

    def live_labels(self) -> np.ndarray:
        """The live labels, ascending (int64)."""
        return np.flatnonzero(self._alive[: self._next]).astype(np.int64)

    def dead_labels(self) -> np.ndarray:
        """Labels handed out and since removed, ascending (int64)."""
        return np.flatnonzero(~self._alive[: self._next]).astype(np.int64)

    def _bytes_of(self, label: int) -> bytes:
        return self._data[self._offsets[label]: self._offsets[label + 1]].tobytes()

    def _lookup(self, encoded: Sequence[bytes], hashes: np.ndarray) -> np.ndarray:
        labels = np.full(len(encoded), -1, dtype=np.int64)
        if not len(encoded) or not self._live:
            return labels
        # Sorted needles make searchsorted walk the table in order (several times faster).
        order = np.argsort(hashes)
        left = np.empty(len(encoded), np.int64)
        left[order] = np.searchsorted(self._sorted_hashes, hashes[order], side="left")
        last = self._live - 1
        found = self._sorted_hashes[np.minimum(left, last)] == hashes
        found &= left <= last
        run = found & (left < last) & (self._sorted_hashes[np.minimum(left + 1, last)] == hashes)
        single = np.flatnonzero(found & ~run)
        if single.size:  # the usual case, checked byte for byte in bulk
            candidates = self._sorted_labels[left[single]]
            match = self._same_bytes(encoded, single, candidates)
            labels[single[match]] = candidates[match]
        for row in np.flatnonzero(run).tolist():
            # Two live ids share this 64-bit hash: compare each candidate of the run.
            for position in range(int(left[row]), self._live):
                if self._sorted_hashes[position] != hashes[row]:
                    break
                label = int(self._sorted_labels[position])
                if self._bytes_of(label) == encoded[row]:
                    labels[row] = label
                    break
        return labels

    def _same_bytes(self, encoded: Sequence[bytes], rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Whether ``encoded[rows[i]]`` equals the stored id of ``labels[i]``, for every i (bool)."""
        starts = self._offsets[labels]
        stored_lengths = self._offsets[labels + 1] - starts
        wanted = [encoded[row] for row in rows.tolist()]
        lengths = np.fromiter(map(len, wanted), dtype=np.int64, count=len(wanted))
        same = lengths == stored_lengths
        if not same.any():
            return same
        keep = np.flatnonzero(same)
        query = np.frombuffer(b"".join([wanted[i] for i in keep.tolist()]), np.uint8)
        bounds = np.zeros(keep.size + 1, np.int64)
        np.cumsum(lengths[keep], out=bounds[1:])
        gather = np.repeat(starts[keep] - bounds[:-1], lengths[keep]) + np.arange(int(bounds[-1]), dtype=np.int64)
        differing = np.add.reduceat((self._data[gather] != query).astype(np.int64), bounds[:-1])
        same[keep] = differing == 0
        return same

    def labels_of(self, ids: Sequence[str]) -> np.ndarray:
        """The live label of each id (int64), -1 where the id is absent or removed."""
        encoded = encode_ids(ids)
        return self._lookup(encoded, hash_ids(encoded))

    def ids_of(self, labels: np.ndarray) -> list[str]:
        """The id of each label; ``""`` for -1 (FAISS's "no result") and removed labels."""
        labels = np.asarray(labels, dtype=np.int64).ravel()
        out = [""] * labels.shape[0]
        valid = (labels >= 0) & (labels < self._next)
        valid[valid] = self._alive[labels[valid]]
        data, offsets = self._data, self._offsets
        for row in np.flatnonzero(valid).tolist():
            label = labels[row]
            out[row] = data[offsets[label]: offsets[label + 1]].tobytes().decode("utf-8")
        return out

    def __contains__(self, doc_id: str) -> bool:
        return isinstance(doc_id, str) and bool(doc_id) and int(self.labels_of([doc_id])[0]) >= 0

    # ----------------------------------------------------------------- mutation
    def add(self, ids: Sequence[str]) -> np.ndarray:
        """Add new ids; returns their labels (consecutive, int64).

        Raises:
            AnnInputError: an id is not a non-empty string, repeats within ``ids``, or is live
                already (use :meth:`upsert` to replace).
        """
        encoded = encode_ids(ids)
        hashes = hash_ids(encoded)
        _check_unique(encoded, hashes, "ids")
        present = np.flatnonzero(self._lookup(encoded, hashes) >= 0)
        if present.size:
            raise AnnInputError(f"ids[{int(present[0])}]: {ids[int(present[0])]!r} is already in the map")
        return self._append(encoded, hashes)

    def upsert(self, ids: Sequence[str], name: str = "ids") -> tuple[np.ndarray, np.ndarray]:
        """Add ``ids`` under new consecutive labels; ids already live are retired first.

        Returns:
            ``(new_labels, replaced_labels)``: the labels now naming ``ids`` (int64, in order)
            and the old labels of ids that were already live (now dead: the caller removes them
            from FAISS).

        Raises:
            AnnInputError: an id is not a non-empty string, or appears twice in ``ids``.
        """
        encoded = encode_ids(ids, name)
        hashes = hash_ids(encoded)
        _check_unique(encoded, hashes, name)
        replaced = self._lookup(encoded, hashes)
        replaced = replaced[replaced >= 0]
        if replaced.size:
            self.remove_labels(replaced)
        return self._append(encoded, hashes), replaced

    def _append(self, encoded: Sequence[bytes], hashes: np.ndarray) -> np.ndarray:
        count = len(encoded)
        start = self._next
        labels = np.arange(start, start + count, dtype=np.int64)
        if not count:
            return labels
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=count)
        total = int(lengths.sum())
        self._data = _grow(self._data, self._nbytes + total)
        self._data[self._nbytes: self._nbytes + total] = np.frombuffer(b"".join(encoded), np.uint8)
        self._offsets = _grow(self._offsets, start + count + 1)
        self._offsets[start + 1: start + count + 1] = self._nbytes + np.cumsum(lengths)
        self._alive = _grow(self._alive, start + count)
        self._alive[start: start + count] = True
        self._nbytes += total
        self._next += count
        self._live += count
        order = np.argsort(hashes, kind="stable")
        positions = np.searchsorted(self._sorted_hashes, hashes[order], side="right")
        self._sorted_hashes = np.insert(self._sorted_hashes, positions, hashes[order])
        self._sorted_labels = np.insert(self._sorted_labels, positions, labels[order])
        return labels

    def remove_labels(self, labels: np.ndarray) -> None:
        """Retire live ``labels`` (their ids stop resolving); dead or unknown labels are ignored."""
        labels = np.unique(np.asarray(labels, dtype=np.int64))
        labels = labels[(labels >= 0) & (labels < self._next)]
        labels = labels[self._alive[labels]]
        if not labels.size:
            return
        self._alive[labels] = False
        self._live -= int(labels.size)
        # Find each label's table slot through its id's hash (the run of equal hashes is short).
        hashes = hash_ids([self._bytes_of(int(label)) for label in labels])
        left = np.searchsorted(self._sorted_hashes, hashes, side="left")
        slots = left.copy()
        mismatch = self._sorted_labels[np.minimum(left, len(self._sorted_labels) - 1)] != labels
        for row in np.flatnonzero(mismatch).tolist():
            run = self._sorted_labels[left[row]:]
            slots[row] = left[row] + int(np.flatnonzero(run == labels[row])[0])
        keep = np.ones(self._sorted_labels.shape[0], bool)
        keep[slots] = False
        self._sorted_hashes = self._sorted_hashes[keep]
        self._sorted_labels = self._sorted_labels[keep]

    def copy(self) -> IdMap:
        """An independent copy (trimmed to size)."""
        clone = IdMap()
        clone._data = self._data[: self._nbytes].copy()
        clone._nbytes = self._nbytes
        clone._offsets = self._offsets[: self._next + 1].copy()
        clone._alive = self._alive[: self._next].copy()
        clone._next, clone._live = self._next, self._live
        clone._sorted_hashes = self._sorted_hashes.copy()
        clone._sorted_labels = self._sorted_labels.copy()
        return clone

    def compacted(self) -> IdMap:
        """A new map of the live ids only, relabelled 0..len-1 in label order (HNSW rebuilds)."""
        live = self.live_labels()
        starts, ends = self._offsets[live], self._offsets[live + 1]
        lengths = ends - starts
        offsets = np.zeros(live.shape[0] + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Gather every live byte at once: position p of the new buffer comes from old start + (p - new start).
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(offsets[-1]), dtype=np.int64)
        out = IdMap()
        out._data = self._data[gather]
        out._nbytes = int(offsets[-1])
        out._offsets = offsets
        out._alive = np.ones(live.shape[0], bool)
        out._next = out._live = int(live.shape[0])
        # Relabel the table: old label -> new position; the hash order stays.
        new_of_old = np.full(self._next, -1, dtype=np.int64)
        new_of_old[live] = np.arange(live.shape[0], dtype=np.int64)
        out._sorted_hashes = self._sorted_hashes.copy()
        out._sorted_labels = new_of_old[self._sorted_labels]
        return out

    # ----------------------------------------------------------------- bytes
    def write(self, sink: Callable[[Any], Any]) -> int:
        """Stream the map into ``sink(bytes-like)`` piece by piece; returns the bytes written."""
        header = json.dumps({"next_label": self._next, "live": self._live, "data_bytes": self._nbytes}).encode()
        pieces = [MAGIC, struct.pack("<Q", len(header)), header]
        arrays = [self._offsets[: self._next + 1].astype("<i8", copy=False),
                  self._alive[: self._next].view(np.uint8),
                  self._data[: self._nbytes],
                  self._sorted_hashes.astype("<u8", copy=False),
                  self._sorted_labels.astype("<i8", copy=False)]
        written = 0
        for piece in pieces:
            sink(piece)
            written += len(piece)
        for array in arrays:
            view = memoryview(np.ascontiguousarray(array)).cast("B")
            for start in range(0, len(view), WRITE_BLOCK):
                sink(view[start: start + WRITE_BLOCK])
            written += len(view)
        return written

    @classmethod
    def read(cls, read_exact: Callable[[int], bytes], readinto: Callable[[memoryview], None],
             where: str = "ids") -> IdMap:
        """Read a map written by :meth:`write`.

        Args:
            read_exact: ``n -> exactly n bytes`` (small reads: the header).
            readinto: fills a whole writable buffer (the arrays, read in place: no second copy).
            where: the file or URI named in errors.
        """
        if read_exact(len(MAGIC)) != MAGIC:
            raise ValueError(f"{where}: not an IdMap (bad magic bytes)")
        (length,) = struct.unpack("<Q", read_exact(8))
        header = json.loads(read_exact(length))
        out = cls()
        count, nbytes = int(header["next_label"]), int(header["data_bytes"])
        live = int(header["live"])
        out._offsets = np.empty(count + 1, "<i8")
        out._alive = np.empty(count, bool)
        out._data = np.empty(nbytes, np.uint8)
        out._sorted_hashes = np.empty(live, "<u8")
        out._sorted_labels = np.empty(live, "<i8")
        for array in (out._offsets, out._alive, out._data, out._sorted_hashes, out._sorted_labels):
            readinto(memoryview(array).cast("B"))
        out._nbytes, out._next, out._live = nbytes, count, live
        out._sorted_hashes = out._sorted_hashes.astype(np.uint64, copy=False)
        if int(out._alive.sum()) != live or out._offsets[-1] != nbytes:
            raise ValueError(f"{where}: inconsistent IdMap ({live} live in the header, "
                             f"{int(out._alive.sum())} alive; {nbytes} data bytes vs offsets {out._offsets[-1]})")
        return out

    def to_bytes(self) -> bytes:
        """The binary form as one ``bytes`` (small maps and tests; snapshots stream :meth:`write`)."""
        pieces: list[bytes] = []
        self.write(lambda piece: pieces.append(bytes(piece)))
        return b"".join(pieces)

    @classmethod
    def from_bytes(cls, data: bytes) -> IdMap:
        view = memoryview(data)
        position = 0

        def read_exact(n: int) -> bytes:
            nonlocal position
            if position + n > len(view):
                raise ValueError(f"ids: truncated IdMap ({len(view)} bytes, wanted {position + n})")
            position += n
            return view[position - n: position].tobytes()

        def readinto(buffer: memoryview) -> None:
            buffer[:] = read_exact(len(buffer))

        return cls.read(read_exact, readinto)


def _check_unique(encoded: Sequence[bytes], hashes: np.ndarray, name: str) -> None:
    """Refuse an id repeated within one call (equal hashes are compared byte for byte)."""
    if len(encoded) < 2:
        return
    unique, counts = np.unique(hashes, return_counts=True)
    if counts.max() == 1:
        return
    for value in unique[counts > 1].tolist():
        rows = np.flatnonzero(hashes == value).tolist()
        seen: set[bytes] = set()
        for row in rows:
            if encoded[row] in seen:
                raise AnnInputError(f"{name}: {encoded[row].decode('utf-8')!r} appears more than once")
            seen.add(encoded[row])
