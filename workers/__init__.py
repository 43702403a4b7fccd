"""The Celery app and one module per queue."""
