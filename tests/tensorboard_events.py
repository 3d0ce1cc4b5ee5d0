"""Read TensorBoard event files back, independently of the writer: the TFRecord framing (length,
its CRC, the record, its CRC) read by hand, each record parsed as an ``Event`` protobuf
(``tensorboard`` itself is not a dependency; tensorboardX ships the same ``event.proto``)."""

from __future__ import annotations

import struct
from pathlib import Path


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (Castagnoli), bit by bit: slow, but the files here are small."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(folder: Path) -> list:
    """Every ``Event`` of every event file directly in ``folder``, file by file in name order,
    each record's CRCs checked."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
            assert header_crc == _masked_crc32c(header), f"{path}: corrupt record header at byte {pos}"
            record = data[pos + 12:pos + 12 + length]
            (record_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
            assert record_crc == _masked_crc32c(record), f"{path}: corrupt record at byte {pos}"
            events.append(event_pb2.Event.FromString(record))
            pos += 16 + length
    return events


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of the scalar summaries in ``folder``'s event files, as TensorBoard
    shows them: a restart marker (``SessionLog.START`` at step s, written by a writer that trains
    steps again) drops the events read before it at steps >= s."""
    from tensorboardX.proto.event_pb2 import SessionLog

    out: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(folder):
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            out = {tag: [(step, value) for step, value in points if step < event.step] for tag, points in out.items()}
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
