"""The one Celery app, configured from `ServiceSettings`.

Start a worker with ``clues worker`` (or ``celery -A workers.celery_app worker``). Tasks are acknowledged late and
rejected back to the queue when the worker process is lost, so a task that was running on a killed worker runs
again elsewhere: every task is idempotent. The API imports this module only to ``send_task`` by name.
"""

from __future__ import annotations

from celery import Celery

from workers.config import ServiceSettings


def configure(app: Celery, settings: ServiceSettings) -> Celery:
    """Point ``app`` at the settings' broker and result backend, with the delivery guarantees tasks rely on."""
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if settings.redis_url:  # kombu's SQLAlchemy transport passes transport options to create_engine: Redis only
        app.conf.broker_transport_options = {"visibility_timeout": settings.visibility_timeout}
        app.conf.result_backend_transport_options = {"visibility_timeout": settings.visibility_timeout}
    app.conf.clues_settings = settings
    return app


def create_celery(settings: ServiceSettings | None = None) -> Celery:
    """A configured Celery app whose worker imports `workers.tasks`."""
    return configure(Celery("clues", include=["workers.tasks"]), settings or ServiceSettings())


celery_app = create_celery()
