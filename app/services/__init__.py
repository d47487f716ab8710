"""The coordinator's service layer: job and training lifecycles as plain functions, shared by the REST routes
(`app.routes`) and the admin's pages (`app.ui`). Routes parse, call a service and shape the answer; no route imports
another route's helpers. Services raise typed errors, which `app.errors` maps to HTTP statuses.
"""

from __future__ import annotations


class QueueUnavailable(Exception):
    """The task queue (the broker) could not take a step (503); the job's state was put back."""

    def __init__(self, cause: BaseException):
        super().__init__(f"the task queue is unreachable ({type(cause).__name__}: {cause}); try again")
