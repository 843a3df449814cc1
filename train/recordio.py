"""insightface ``train.rec`` / ``train.idx`` (MXNet RecordIO) read and written without mxnet.

Format (dmlc-core ``recordio``, little-endian):

* a record is ``uint32 magic 0xced7230a``, ``uint32 lrec`` (``cflag = lrec >> 29``, ``length = lrec & (2**29-1)``),
  ``length`` payload bytes, zero padding to a multiple of 4. ``cflag`` 0 is a whole record; a payload that
  contains the magic word at a 4-byte aligned position is split there into parts with cflag 1 (first),
  2 (middle), 3 (last), and the reader puts the magic word back between the parts;
* the payload of an image record is an ``IRHeader`` struct ``<IfQQ`` (flag, label, id, id2); when
  ``flag > 0`` the label is an array of ``flag`` float32 that follows the header; the encoded image follows;
* ``train.idx`` has one ``key<TAB>byte offset`` line per record (read into numpy by :mod:`train.recordio_index`).

insightface datasets put a header record at key 0 whose label is ``(first identity key, end key)``: image
keys are ``1 .. label[0]-1`` and identity records ``label[0] .. label[1]-1`` each carry ``(first, end)``
image keys of one identity.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from .recordio_index import RecordIndex, cached_array, parse_idx, release_parser_memory

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)


class RecordIOError(ValueError):
    """A RecordIO file is malformed; the message names the file and the offset."""


@dataclass
class IRHeader:
    """Image record header: ``flag`` (label array length, 0 for a scalar label), label(s), ids."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_record(header: IRHeader, payload: bytes) -> bytes:
    """Build an image record payload (header, optional label array, image bytes) like ``mx.recordio.pack``."""
    label = header.label
    if isinstance(label, (int, float, np.floating, np.integer)):
        return struct.pack(_IR_FORMAT, 0, float(label), header.id, header.id2) + payload
    arr = np.asarray(label, dtype="<f4").ravel()
    return struct.pack(_IR_FORMAT, arr.size, 0.0, header.id, header.id2) + arr.tobytes() + payload


def unpack_record(record: bytes) -> tuple[IRHeader, bytes]:
    """Split an image record payload into its :class:`IRHeader` and the image bytes."""
    if len(record) < _IR_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {_IR_SIZE}-byte IRHeader")
    flag, label, id1, id2 = struct.unpack_from(_IR_FORMAT, record)
    body = record[_IR_SIZE:]
    if flag > 0:
        n = 4 * flag
        if len(body) < n:
            raise RecordIOError(f"record declares {flag} labels but holds only {len(body)} bytes after the header")
        return IRHeader(flag, np.frombuffer(body[:n], dtype="<f4").copy(), id1, id2), body[n:]
    return IRHeader(flag, label, id1, id2), body


def _write_one(f: BinaryIO, payload: bytes) -> None:
    """Write one record, splitting at aligned occurrences of the magic word as dmlc-core does."""
    n = len(payload)
    if n >= 1 << 29:
        raise RecordIOError(f"RecordIO records must be < 2**29 bytes, got {n}")
    start = 0
    for i in range(0, (n // 4) * 4, 4):
        if payload[i:i + 4] == _MAGIC_BYTES:
            flag = 1 if start == 0 else 2
            f.write(_MAGIC_BYTES + struct.pack("<I", (flag << 29) | (i - start)) + payload[start:i])
            start = i + 4
    flag = 3 if start else 0
    f.write(_MAGIC_BYTES + struct.pack("<I", (flag << 29) | (n - start)) + payload[start:])
    f.write(b"\0" * ((-n) % 4))


def write_recordio(rec_path: str | Path, idx_path: str | Path, records: Iterable[tuple[int, bytes]]) -> int:
    """Write ``(key, payload)`` records into ``rec_path`` and their offsets into ``idx_path``; returns the count."""
    rec_path, idx_path = Path(rec_path), Path(idx_path)
    count = 0
    with open(rec_path, "wb") as f, open(idx_path, "w") as fi:
        for key, payload in records:
            fi.write(f"{int(key)}\t{f.tell()}\n")
            _write_one(f, payload)
            count += 1
    return count


def write_image_dataset(rec_path: str | Path, idx_path: str | Path, images_by_identity: list[list[bytes]]) -> int:
    """Write an insightface-layout dataset (header record, images, identity records) from encoded images."""
    n_images = sum(len(v) for v in images_by_identity)
    first_id_key = n_images + 1
    end_key = first_id_key + len(images_by_identity)

    def records():
        yield 0, pack_record(IRHeader(2, np.array([first_id_key, end_key], np.float32), 0, 0), b"")
        key = 1
        spans = []
        for label, images in enumerate(images_by_identity):
            start = key
            for img in images:
                yield key, pack_record(IRHeader(0, float(label), key, 0), img)
                key += 1
            spans.append((start, key))
        for i, (a, b) in enumerate(spans):
            yield first_id_key + i, pack_record(IRHeader(2, np.array([a, b], np.float32), 0, 0), b"")

    return write_recordio(rec_path, idx_path, records())


#: An identity record as insightface writes it: RecordIO head, IRHeader with flag 2, the (first, end) keys.
_IDENTITY_RECORD = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                             ("id2", "<u8"), ("first", "<f4"), ("end", "<f4")])


class RecordIOReader:
    """Random access to an indexed RecordIO file (``.rec`` + ``.idx``); safe to use from forked workers.

    The index is a :class:`train.recordio_index.RecordIndex` (numpy arrays, memory-mapped from a sidecar
    after the first open). The file is opened lazily per process (a handle inherited through ``fork`` would
    share its offset).
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        for p in (self.rec_path, self.idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"RecordIO file not found: {p}")
        try:
            table = cached_array("index", self.idx_path, self.rec_path, lambda: parse_idx(self.idx_path),
                                 release_parser_memory)
        except ValueError as e:
            raise RecordIOError(str(e)) from None
        self.index = RecordIndex(table, self.idx_path)
        self._file: BinaryIO | None = None
        self._pid = -1

    @property
    def keys(self) -> np.ndarray:
        """Every record key, sorted."""
        return self.index.keys

    def _handle(self) -> BinaryIO:
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_file"], d["_pid"] = None, -1
        return d

    def __len__(self) -> int:
        return len(self.index)

    def read_at(self, offset: int) -> bytes:
        """Read the (re-joined) record that starts at byte ``offset``."""
        f = self._handle()
        f.seek(offset)
        parts: list[bytes] = []
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise RecordIOError(f"{self.rec_path}: truncated record header at offset {f.tell() - len(head)}")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(f"{self.rec_path}: bad magic 0x{magic:08x} at offset {f.tell() - 8}")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            data = f.read(length)
            if len(data) < length:
                raise RecordIOError(f"{self.rec_path}: record at offset {offset} is truncated")
            f.seek((-length) % 4, os.SEEK_CUR)
            parts.append(data)
            if cflag in (0, 3):
                break
            if cflag not in (1, 2):
                raise RecordIOError(f"{self.rec_path}: bad continuation flag {cflag} at offset {offset}")
        return _MAGIC_BYTES.join(parts)

    def read(self, key: int) -> bytes:
        """Payload of the record with ``key``."""
        try:
            return self.read_at(self.index.offset(key))
        except KeyError:
            raise KeyError(f"{self.rec_path}: no record with key {key}") from None

    def read_image(self, key: int) -> tuple[IRHeader, bytes]:
        """``(header, encoded image bytes)`` of the image record ``key``."""
        return unpack_record(self.read(key))

    def image_keys_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Image keys and integer labels: from the insightface header and identity records when they cover
        every image (one read of the identity block), else each image's own header (cached in a sidecar)."""
        if not len(self.index):
            raise RecordIOError(f"{self.idx_path}: no records")
        first_id, spans = self._insightface_spans()
        if spans is not None:
            lengths = spans[:, 1] - spans[:, 0]
            if len(spans) and spans[0, 0] == 1 and spans[-1, 1] == first_id \
                    and (spans[1:, 0] == spans[:-1, 1]).all() and (lengths > 0).all():
                keys = np.arange(1, first_id, dtype=np.int64)
                return keys, np.repeat(np.arange(len(spans), dtype=np.int64), lengths)
        table = cached_array("labels", self.idx_path, self.rec_path, lambda: self._labels_from_headers(first_id, spans))
        return table[0], table[1]

    def _insightface_spans(self) -> tuple[int, np.ndarray | None]:
        """``(first identity key, the identity records' (first, end) image keys)`` when record 0 is an
        insightface header, else ``(0, None)``."""
        if self.index.first_key != 0:
            return 0, None
        header, _ = self.read_image(0)
        if header.flag <= 0:
            return 0, None
        first_id = int(header.label[0])
        return first_id, self._identity_spans(first_id, int(header.label[1]))

    def _labels_from_headers(self, first_id: int, spans: np.ndarray | None) -> np.ndarray:
        """``[image keys, labels]``: identity spans where they cover a key, else the image's own header."""
        if spans is None:
            keys = np.asarray(self.keys, dtype=np.int64)
            return np.stack([keys, np.array([self._label_of(int(k)) for k in keys], dtype=np.int64)])
        keys = np.arange(1, first_id, dtype=np.int64)
        labels = np.full(len(keys), -1, np.int64)
        for ident, (a, b) in enumerate(spans):
            labels[a - 1:b - 1] = ident
        if (labels < 0).any():  # identity records incomplete: read each image header instead
            labels[:] = [self._label_of(int(k)) for k in keys]
        return np.stack([keys, labels])

    def _identity_spans(self, first_id: int, end: int) -> np.ndarray:
        """``(first, end)`` image keys of each identity record ``first_id .. end-1`` (K×2 int64).

        insightface writes them back to back, 40 bytes each: then they are read in one block and decoded
        with numpy; otherwise record by record."""
        ids = np.arange(first_id, end, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, 2), np.int64)
        offsets = self.index.offsets[self.index.positions(ids)]
        size = _IDENTITY_RECORD.itemsize
        if (np.diff(offsets) == size).all():
            f = self._handle()
            f.seek(int(offsets[0]))
            raw = f.read(size * len(ids))
            if len(raw) == size * len(ids):
                rec = np.frombuffer(raw, _IDENTITY_RECORD)
                if (rec["magic"] == MAGIC).all() and (rec["lrec"] == size - 8).all() and (rec["flag"] == 2).all():
                    return np.stack([rec["first"], rec["end"]], axis=1).astype(np.int64)
        spans = []
        for k in ids:
            h, _ = self.read_image(int(k))
            spans.append((int(h.label[0]), int(h.label[1])))
        return np.asarray(spans, np.int64).reshape(-1, 2)

    def _label_of(self, key: int) -> int:
        f = self._handle()
        f.seek(self.index.offset(key) + 8)
        head = f.read(_IR_SIZE + 4)
        flag, label, _, _ = struct.unpack_from(_IR_FORMAT, head)
        if flag > 0:
            label = struct.unpack_from("<f", head, _IR_SIZE)[0]
        return int(label)
