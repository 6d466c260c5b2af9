"""The listener's own file meta encoder gives pynetdicom's bytes exactly."""

import io
from types import SimpleNamespace

import pytest
from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta as pynetdicom_encode
from pynetdicom.events import Event

from pacsbridge.shared.dicom.filemeta import encode_file_meta, encoded_instance

from .helpers import readable_test_files


def _store_event(sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes) -> Event:
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 0
    request.DataSet = io.BytesIO(data)
    context = SimpleNamespace(transfer_syntax=UID(transfer_syntax), context_id=1, abstract_syntax=UID(sop_class))
    return Event(SimpleNamespace(), evt.EVT_C_STORE, {"request": request, "context": context})


def _metas():
    """(SOP class, SOP instance, transfer syntax) of every readable pydicom test file with a file meta."""
    out = {}
    for path in readable_test_files():
        try:
            meta = dcmread(path, stop_before_pixels=True).file_meta
            key = (str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                   str(meta.TransferSyntaxUID))
        except Exception:
            continue
        if all(key) and all(k.isascii() and len(k) <= 64 for k in key):
            out.setdefault(key[2], key)  # one per transfer syntax, and some odd-length UIDs on the way
    return sorted(out.values())


@pytest.mark.parametrize("sop_class,sop_instance,transfer_syntax", _metas())
def test_same_bytes_as_pynetdicom_for_real_files(sop_class, sop_instance, transfer_syntax):
    ours = encode_file_meta(sop_class, sop_instance, transfer_syntax)
    theirs = pynetdicom_encode(create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
                                                transfer_syntax=UID(transfer_syntax)))
    assert ours == theirs


@pytest.mark.parametrize("sop_instance", ["1", "12", "1.2.3", "1.23", "9" * 63, "9" * 64])
def test_padding_of_odd_and_even_uids(sop_instance):
    theirs = pynetdicom_encode(create_file_meta(sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"),
                                                sop_instance_uid=UID(sop_instance),
                                                transfer_syntax=ExplicitVRLittleEndian))
    assert encode_file_meta("1.2.840.10008.5.1.4.1.1.2", sop_instance, ExplicitVRLittleEndian) == theirs


def test_encoded_instance_equals_pynetdicoms_encoded_dataset():
    data = bytes(range(256)) * 2048  # the data set is copied as it came, whatever it holds
    event = _store_event("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.2.1143.1", ExplicitVRLittleEndian, data)
    assert encoded_instance(event) == event.encoded_dataset()
    assert event.request.DataSet.getvalue() == data  # and left usable (the view was released)
    event.request.DataSet.write(b"more")  # a live export would make this raise BufferError


def test_values_we_do_not_encode_fall_back_to_pynetdicom():
    sop_instance = "1.2.3.\u00e9"  # pynetdicom lets it into the request; pydicom writes it somehow
    event = _store_event("1.2.840.10008.5.1.4.1.1.2", sop_instance, ExplicitVRLittleEndian,
                         b"\x08\x00\x05\x00CS\x00\x00")
    with pytest.raises(ValueError):
        encode_file_meta("1.2.840.10008.5.1.4.1.1.2", sop_instance, ExplicitVRLittleEndian)
    assert encoded_instance(event) == event.encoded_dataset()


def test_too_long_values_are_refused():
    with pytest.raises(ValueError):
        encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1." + "2" * 70, ExplicitVRLittleEndian)
    with pytest.raises(ValueError):
        encode_file_meta("1.2", "1.2", ExplicitVRLittleEndian, implementation_version="X" * 17)


def test_malloc_thresholds_are_set_and_keep_big_buffers_mapped():
    """shared/core/memtune.py: on glibc the thresholds are set (the switch turns it off), and afterwards
    half-megabyte buffers allocated and freed in turn do not fault their pages in each time."""
    import subprocess
    import sys

    probe = (
        "import resource, sys\n"
        "from pacsbridge.shared.core.memtune import tune_malloc\n"
        "ok = tune_malloc()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(200):\n"
        "    b = bytearray(512 * 1024); b[::4096] = b'x' * len(b[::4096]); del b\n"
        "print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    import os

    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) < 200 * 128 // 4, out  # faulting every buffer in would be 200 x 128 pages
    off = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PACSBRIDGE_MALLOC_TUNE": "0"}).stdout.split()
    assert off[0] == "False"


def test_the_written_out_implementation_identity_is_the_installed_pynetdicoms():
    # filemeta.py writes pynetdicom's two constants out so that a de-identifying command need not import
    # pynetdicom; they must stay the ones pynetdicom itself writes (the pin admits one release)
    import pynetdicom

    from pacsbridge.shared.dicom import filemeta

    assert filemeta.PYNETDICOM_IMPLEMENTATION_UID == pynetdicom.PYNETDICOM_IMPLEMENTATION_UID
    assert filemeta.PYNETDICOM_IMPLEMENTATION_VERSION == pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION


def test_a_de_identifying_process_does_not_import_pynetdicom():
    import subprocess
    import sys

    code = ("import sys\n"
            "from pacsbridge.shared.deid.keys import KeyedIdentity, ProjectKey\n"
            "from pacsbridge.shared.deid.options import ProjectConfig\n"
            "from pacsbridge.shared.deid.profile import Profile\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pynetdicom'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
