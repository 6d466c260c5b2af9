"""A C-STORE that contradicts itself, against the real listener (issue 14, item 11)."""

from __future__ import annotations

import pytest

from .helpers import make_instance
from .test_listener_stall import _stack


@pytest.mark.parametrize("chunked", ["0", "1"])
def test_a_command_uid_that_is_not_the_data_sets_is_refused(tmp_path, chunked):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    stack = _stack(tmp_path, PACSBRIDGE_CHUNKED=chunked)
    try:
        stack.start("listener")
        from pydicom import Dataset
        from pydicom.uid import UID

        class Liar(Dataset):
            """pynetdicom takes the command's AffectedSOPInstanceUID from this attribute; the
            encoded data set keeps its own element."""
            SOPInstanceUID = property(lambda self: UID("1.2.3.4"))

        ds = make_instance(PatientID="LIAR", SOPInstanceUID="../../x")
        liar = Liar(dict(ds))
        liar.file_meta = ds.file_meta
        good = make_instance(PatientID="HONEST")
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", stack.port, ae_title="PACSBRIDGE")
        assert assoc.is_established
        status = assoc.send_c_store(liar)
        ok = assoc.send_c_store(good)
        assoc.release()
        assert status.Status == 0xC210 and ok.Status == 0x0000
        assert "AffectedSOPInstanceUID" in str(status.get("ErrorComment", ""))
        stored = [p for p in stack.settings.storage.rglob("*.dcm") if ".incoming" not in p.parts]
        assert len(stored) == 1 and "HONEST" in str(stored[0])
        log = "".join(p.read_text() for p in stack.logs.iterdir())
        assert "1.2.3.4" in log and "'../../x'" in log
    finally:
        stack.close()
