"""The wire of a lean C-STORE request: a stored file framed as P-DATA-TF PDUs and written in one go.

pynetdicom sends a C-STORE as one P-DATA primitive per PDU, each handed to
its DUL reactor thread through a queue, encoded there and written with its
own ``send``. A peer with a small maximum PDU (DCMTK ``storescp``: 16 KB)
makes a 0.5 MB instance ~34 such hand-offs, each with Python work in two
threads that share the GIL: most of the ~4 ms of CPU per instance a push
spent. Here the sending thread reads the file once, frames every P-DATA-TF
PDU itself (the PDV layout of PS3.8 9.3.5 / E.2, the same fragmentation
pynetdicom uses) and writes them all with one ``sendmsg`` loop on the
association's socket; the response still comes back through pynetdicom's
DUL and DIMSE provider (``get_msg``), so association state,
timeouts and aborts are pynetdicom's.

This module touches no pynetdicom object: the sender that attaches to an
association (its socket, its DIMSE queue, its parked reactor) is
:class:`pacsbridge.shared.dicom.compat.store.FastStore`.
"""

from __future__ import annotations

import select
import socket
import struct

__all__ = ["command_set", "dataset_offset", "file_meta", "pdus", "send_all", "SendFailed"]

#: The C-STORE-RQ command field, and "a data set follows" (anything but 0x0101).
_C_STORE_RQ = 0x0001
_HAS_DATASET = 0x0001
#: pynetdicom's default C-STORE priority (LOW), kept for identical requests.
PRIORITY = 0x0002
#: Explicit VR with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
#: sendmsg buffers per call (Linux IOV_MAX is 1024).
_IOV = 512


class SendFailed(Exception):
    """The request could not be written (connection lost or the peer stopped reading)."""


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _elem_us(elem: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, elem, 2, value)


def _elem_ui(elem: int, value: str) -> bytes:
    raw = _uid(value)
    return struct.pack("<HHI", 0x0000, elem, len(raw)) + raw


def command_set(sop_class: str, sop_instance: str, message_id: int, priority: int = PRIORITY) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian (PS3.7 9.3.1.1), as pynetdicom encodes it."""
    body = b"".join((
        _elem_ui(0x0002, sop_class),
        _elem_us(0x0100, _C_STORE_RQ),
        _elem_us(0x0110, message_id),
        _elem_us(0x0700, priority),
        _elem_us(0x0800, _HAS_DATASET),
        _elem_ui(0x1000, sop_instance),
    ))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def dataset_offset(data: bytes | memoryview) -> int:
    """Where the data set starts in a DICOM file: after the preamble and the group 0002 elements.

    Raises ValueError when the file meta is not a well-formed explicit VR
    little endian group 0002 (what pynetdicom's ``split_dataset`` reads).
    """
    mv = memoryview(data)
    if len(mv) < 132 or bytes(mv[128:132]) != b"DICM":
        raise ValueError("no DICOM preamble")
    pos, end = 132, len(mv)
    while pos + 8 <= end:
        group, = struct.unpack_from("<H", mv, pos)
        if group != 0x0002:
            return pos
        vr = bytes(mv[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > end:
                break
            length, = struct.unpack_from("<I", mv, pos + 8)
            pos += 12 + length
        else:
            length, = struct.unpack_from("<H", mv, pos + 6)
            pos += 8 + length
        if length == 0xFFFFFFFF:
            raise ValueError("undefined length in the file meta")
    if pos == end:
        return pos  # a file meta and no data set
    raise ValueError("truncated file meta")


_META_TAGS = {0x0002: "MediaStorageSOPClassUID", 0x0003: "MediaStorageSOPInstanceUID", 0x0010: "TransferSyntaxUID"}


def file_meta(path: str, head: int = 8192) -> dict[str, str] | None:
    """SOP class, SOP instance and transfer syntax UIDs from a file's group 0002, without pydicom.

    ``None`` when the file does not start with a preamble and a well-formed
    explicit VR little endian group 0002 within its first ``head`` bytes
    (the caller then asks pydicom). Raises OSError when the file cannot be read.
    """
    with open(path, "rb") as fh:
        data = fh.read(head)
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    out: dict[str, str] = {}
    pos, end = 132, len(data)
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            return out
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > end:
                return None
            length, = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            length, = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        if length == 0xFFFFFFFF or start + length > end:
            return None
        if elem in _META_TAGS:
            try:
                out[_META_TAGS[elem]] = data[start:start + length].decode("ascii").rstrip("\x00 ")
            except UnicodeDecodeError:
                return None
        pos = start + length
    return out if pos == end and len(data) < head else None


def pdus(context_id: int, command: bytes, dataset: memoryview, max_pdu: int) -> list[bytes | memoryview]:
    """P-DATA-TF PDUs (as buffers to write in order) for one command set and its data set.

    One PDV per PDU, each PDV at most ``max_pdu - 6`` bytes of data (``0``:
    unlimited), control header 0x01/0x03 for command fragments and 0x00/0x02
    for data set fragments (last fragment: bit 1 set), as pynetdicom does.
    """
    out: list[bytes | memoryview] = []

    def frame(chunks: memoryview | bytes, more: int, last: int) -> None:
        size = len(chunks)
        step = size if max_pdu == 0 else max_pdu - 6
        if step <= 0:
            raise ValueError(f"maximum PDU {max_pdu} too small")
        mv = memoryview(chunks)
        offset = 0
        while True:
            piece = mv[offset:offset + step]
            offset += len(piece)
            final = offset >= size
            n = len(piece)
            out.append(struct.pack(">BBIIBB", 0x04, 0x00, n + 6, n + 2, context_id, last if final else more))
            out.append(piece)
            if final:
                return

    frame(command, 0x01, 0x03)
    if len(dataset):
        frame(dataset, 0x00, 0x02)
    return out


def send_all(sock: socket.socket, buffers: list[bytes | memoryview], timeout: float) -> None:
    """Write every buffer; never blocks longer than ``timeout`` without progress."""
    views = [memoryview(b) for b in buffers]
    i = 0
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i:i + _IOV], [], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            _, writable, _ = select.select([], [sock], [], timeout)
            if not writable:
                raise SendFailed(f"the peer read nothing for {timeout:g} s") from None
            continue
        except OSError as exc:
            raise SendFailed(f"the connection was lost: {exc.strerror or exc}") from None
        while sent:
            n = len(views[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0
