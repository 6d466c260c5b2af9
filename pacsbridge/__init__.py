"""pacsbridge: a bridge between a hospital PACS and a research platform."""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
