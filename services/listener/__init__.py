"""The DICOM C-STORE listener (``pacsbridge listener``)."""
