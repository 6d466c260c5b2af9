"""Celery workers: thin tasks over the plain functions of ``pacsbridge.shared``."""
