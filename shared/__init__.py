"""Code shared by every pacsbridge service: configuration, errors, the
Conquest-compatible index, safe storage and the import pipeline."""
import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
