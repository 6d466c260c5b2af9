"""Cohorts (issue 17): a spreadsheet of studies, queried, then transferred, with per-row reports.

Layer: imports ``shared/core``, ``shared/dicom`` and ``shared/deid`` (and, for the store, the
layers below it); the worker's ``cohort`` job kind and the API's cohort routes use it.

- :mod:`.sheets` - the rows: CSV, Excel .xlsx and JSON read into validated rows (problems by row and
  column), reports written as CSV, xlsx or JSON, and the "failed rows" file in the input's own form.
"""
