"""The Celery workers: thin tasks (:mod:`.tasks`) over the indexing of :mod:`pacsbridge.shared.index`
and over the job kinds that only workers run (:mod:`.kinds`, claimed and driven by :mod:`.runner`),
with stable-series detection (:mod:`.stable`) and the selection of stored instances (:mod:`.selection`)."""
