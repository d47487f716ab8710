"""The Celery tasks: one per node of `workers.graph.GRAPH`, each taking ids only and calling `workers.graph.execute`.

Delivery: ``acks_late`` + ``reject_on_worker_lost`` (see `workers.celery_app`), and every step is idempotent and runs
under its lease (`workers.steps.Lease`): a duplicate delivery returns ``"skipped"`` at once. Transient errors put the
step back in the queue and are retried here with exponential backoff; errors in the data or the job's state fail the
job. A worker killed with ``kill -9`` leaves a stale lease that the API's reaper re-sends.
"""

from __future__ import annotations

from functools import cache

from celery import Task

from workers import graph, pipeline
from workers.celery_app import celery_app
from workers.steps import Dispatcher, holder_name

RETRY = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": graph.TRANSIENT,
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 8,
}


@cache
def resources() -> pipeline.Resources:
    """This worker process's storage handles, built on first use from the app's settings."""
    return pipeline.Resources.from_settings(celery_app.conf.clues_settings)


@cache
def dispatcher() -> Dispatcher:
    """This worker process's `Dispatcher`: how a step queues its follow-ups."""

    def send(task: str, args: list, countdown: float | None) -> None:
        celery_app.send_task(task, args=args, countdown=countdown)

    return Dispatcher(resources().sessions, send, celery_app.conf.clues_settings)


def _register(name: str, node: graph.Node) -> Task:
    def run(self: Task, *args: object) -> str:
        return graph.execute(dispatcher(), resources(), name, args, holder_name(self.request.id))

    run.__name__ = run.__qualname__ = name.rsplit(".", 1)[-1]
    run.__doc__ = node.doc
    return celery_app.task(name=name, **RETRY)(run)


TASKS: dict[str, Task] = {name: _register(name, node) for name, node in graph.GRAPH.items()}
"""Task name -> the registered Celery task."""
