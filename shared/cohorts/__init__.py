"""Cohorts (issue 17): many studies from a spreadsheet or a date range, queried first, then pulled and
handed on, with a per-row report and the rows that did not succeed handed back in the input's own form.

* :mod:`.sheets`: CSV, xlsx and JSON rows in, reports and failed-rows files out;
* :mod:`.mass`: a date range as day or week chunks, with filters;
* :mod:`.store`: a cohort's rows in the database.

The job that runs a cohort is :mod:`pacsbridge.worker.kinds.cohort`; the routes :mod:`pacsbridge.api.cohorts`.
"""
