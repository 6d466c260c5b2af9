"""An after-store callback for the listener tests: appends what it is given to a file."""

import os


def record(relpath, header, calling_ae):
    with open(os.environ["PB_TEST_CALLBACK_FILE"], "a", encoding="utf-8") as fh:
        fh.write(f"{relpath}\t{header.get('PatientID')}\t{header.sop_instance_uid}\t{calling_ae}\n")


def explode(relpath, header, calling_ae):
    raise RuntimeError("a broken callback must not cost an instance")
