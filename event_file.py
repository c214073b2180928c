"""TensorBoard scalars, written to the event file in the training process's own thread.

The libraries' ``SummaryWriter`` (tensorboardX, torch.utils.tensorboard) hands events to a
background thread through a bounded queue. When a write fails (a full disk) that thread dies,
the queue fills, and the next ``add_scalar`` blocks the run for good, deaf to SIGTERM. Here a
write happens where it is asked for, and a failure raises there (as ``utils.DiskFullError``
when the disk is full), so the run ends at once with its last good checkpoint kept.

The file is what TensorBoard reads: TFRecord framing (length, masked CRC-32C of the length,
the serialized ``Event``, masked CRC-32C of it) around ``Event`` protocol buffers holding
``Summary`` values with ``simple_value``, encoded here by hand (the few fields needed), so
this writer depends on neither tensorboardX nor tensorboard. Torch-free.

    writer = EventFileWriter("runs/x/tensorboard")
    writer.add_scalar("train/loss", 0.5, step=1)
    writer.flush(); writer.close()
"""
from __future__ import annotations

import os
import socket
import struct
import time

from utils import disk_full_guard


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord files checksum their records."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(wall_time: float, step: int = 0, file_version: str = "",
                 scalars=()) -> bytes:
    """An ``Event``: wall_time (1, double), step (2, int64), file_version (3, string), summary
    (5: ``Summary`` with one ``Value`` (1) per scalar: tag (1, string), simple_value (2,
    float))."""
    event = _field(1, 1, struct.pack("<d", wall_time))
    if step:
        event += _field(2, 0, _varint(step))
    if file_version:
        event += _length_delimited(3, file_version.encode())
    if scalars:
        summary = b"".join(_length_delimited(1, _length_delimited(1, tag.encode())
                                             + _field(2, 5, struct.pack("<f", value)))
                           for tag, value in scalars)
        event += _length_delimited(5, summary)
    return event


def frame(record: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(record))
    return (length + struct.pack("<I", masked_crc32c(length)) + record
            + struct.pack("<I", masked_crc32c(record)))


class EventFileWriter:
    """``add_scalar`` / ``flush`` / ``close`` as SummaryWriter's, synchronous. Events are
    buffered by the file object and reach the disk at ``flush`` (every evaluation) or when the
    buffer fills; any failed write raises in the caller (a full disk: ``DiskFullError``
    naming the event file)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}."
                                         f"{socket.gethostname()}")
        self.failed = False
        with self._guard():
            self._file = open(self.path, "ab")
            self._file.write(frame(encode_event(time.time(), file_version="brain.Event:2")))
            self._file.flush()

    def _guard(self):
        return disk_full_guard(self.path, on_error=self._mark_failed)

    def _mark_failed(self):
        self.failed = True

    def add_scalar(self, tag: str, value: float, step: int):
        with self._guard():
            self._file.write(frame(encode_event(time.time(), step, scalars=[(tag, value)])))

    def flush(self):
        with self._guard():
            self._file.flush()

    def close(self):
        """Flush and close; after a failed write only close (whatever is buffered is lost,
        as the disk had no room for it, and the first error is the one reported)."""
        if self._file.closed:
            return
        if self.failed:
            try:
                self._file.close()
            except OSError:
                pass
            return
        with self._guard():
            self._file.close()
