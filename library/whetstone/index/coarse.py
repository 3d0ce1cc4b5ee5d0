"""Coarse assignment of queries to IVF cells, done once for every shard of a sharded search.

The shards of one IVF build share their cells (``whetstone.index.build.train_shared``), so the
cells a query visits are the same on every shard. Unsharded FAISS finds them once per query (a
search of the ``nlist`` centroids), then scans ``nprobe`` inverted lists; a sharded search in
which every shard finds them itself pays that centroid search S times. With ``nlist`` about
``4 * sqrt(N)`` it costs more than the scan at ``nprobe`` 8 (at 5M documents: 8,944 centroids
against 8 lists of about 560 vectors each), so the ingress does it once
(:meth:`CoarseAssigner.assign`) and every shard scans the lists it was given
(``AnnIndex.search(..., assigned=)``: FAISS's ``search_preassigned``). The results are those of
the shard searching alone: same centroids, same nprobe, same lists.

The assignment names the quantizer it came from (a fingerprint of its serialised bytes); a shard
whose quantizer differs (an index built before the shards shared their cells) ignores it and
assigns the queries itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import faiss
import numpy as np


def quantizer_bytes(quantizer: faiss.Index) -> np.ndarray:
    """``quantizer`` serialised by FAISS (uint8; a few MB: ``nlist x D`` floats)."""
    return faiss.serialize_index(quantizer)


def fingerprint(serialised: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(serialised)), digest_size=16).hexdigest()


def search_preassigned(ivf: faiss.IndexIVF, queries: np.ndarray, k: int, assigned: Assignment,
                       params: faiss.SearchParametersIVF) -> tuple[np.ndarray, np.ndarray]:
    """``ivf``'s top-k of ``queries`` (Q, D), scanning only the cells ``assigned`` names:
    ``(scores, labels)`` as ``ivf.search`` returns them (FAISS's Python wrapper refuses
    ``params``, which carries nprobe and the rest, so the C++ call is made here)."""
    count = queries.shape[0]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    cells = np.ascontiguousarray(assigned.cells, dtype=np.int64)
    coarse = np.ascontiguousarray(assigned.scores, dtype=np.float32)
    params.nprobe = int(cells.shape[1])
    scores = np.empty((count, k), dtype=np.float32)
    labels = np.empty((count, k), dtype=np.int64)
    ivf.search_preassigned_c(count, faiss.swig_ptr(queries), k, faiss.swig_ptr(cells), faiss.swig_ptr(coarse),
                             faiss.swig_ptr(scores), faiss.swig_ptr(labels), False, params)
    return scores, labels


@dataclass(frozen=True)
class Assignment:
    """The cells each query visits: ``cells`` (Q, nprobe) int64 and their scores ``scores``
    (Q, nprobe) float32, from the quantizer named ``fingerprint``."""

    fingerprint: str
    cells: np.ndarray
    scores: np.ndarray

    @staticmethod
    def concat(parts: list[Assignment]) -> Assignment:
        return Assignment(parts[0].fingerprint, np.concatenate([p.cells for p in parts]),
                          np.concatenate([p.scores for p in parts]))


class CoarseAssigner:
    """An IVF index's coarse quantizer, apart from its lists: ``assign`` gives what the index's
    own search would visit (``nprobe`` cells, queries normalised as the index normalises them)."""

    def __init__(self, quantizer: faiss.Index, nprobe: int, normalize: bool, serialised: np.ndarray | None = None,
                 owner: faiss.Index | None = None) -> None:
        """``quantizer`` is used as it is, no copy: an IVF index's own, with that index as ``owner``
        (kept alive here: FAISS frees the quantizer with it); ``serialised``, its bytes when the
        caller has them, names it (serialised here otherwise)."""
        self.quantizer = quantizer
        self._owner = owner
        self.fingerprint = fingerprint(quantizer_bytes(quantizer) if serialised is None else serialised)
        self.nprobe = min(int(nprobe), self.quantizer.ntotal)
        self.normalize = bool(normalize)

    @property
    def nlist(self) -> int:
        return int(self.quantizer.ntotal)

    def to_wire(self, with_quantizer: bool = True) -> dict:
        """``{"fingerprint", "nprobe", "normalize"}``, and the serialised ``"quantizer"`` if asked."""
        wire = {"nprobe": self.nprobe, "normalize": self.normalize, "fingerprint": self.fingerprint}
        if with_quantizer:
            wire["quantizer"] = quantizer_bytes(self.quantizer)
        return wire

    @classmethod
    def from_wire(cls, wire: dict) -> CoarseAssigner:
        serialised = np.ascontiguousarray(wire["quantizer"], dtype=np.uint8)
        assigner = cls(faiss.deserialize_index(serialised), wire["nprobe"], wire["normalize"], serialised)
        if assigner.fingerprint != wire["fingerprint"]:
            raise ValueError(f"coarse quantizer: fingerprint {assigner.fingerprint} of the bytes received "
                             f"is not the {wire['fingerprint']} sent")
        return assigner

    def assign(self, queries: np.ndarray) -> Assignment:
        """The cells (and scores) of ``queries`` (Q, D) float32; the input is not changed."""
        array = np.array(queries, dtype=np.float32, copy=True, order="C")
        if self.normalize:
            faiss.normalize_L2(array)
        scores, cells = self.quantizer.search(array, self.nprobe)
        return Assignment(self.fingerprint, cells, scores)
