"""clues workers: the Celery app and thin task wrappers around scoring and storage (issue #3)."""
