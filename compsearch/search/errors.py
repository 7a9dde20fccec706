"""Errors a user can fix (the CLI prints them as one line and exits with code 2), and the Ray errors that
mean a worker is gone."""
from ray.exceptions import OutOfMemoryError, RayActorError

# A worker process that is gone, not the fault of what it ran: killed, its node lost, or stopped by Ray's
# memory monitor (the node ran low on memory, whoever used it).
WORKER_LOST = (RayActorError, OutOfMemoryError)


class UserError(Exception):
    """Bad input: the message names the offending value and how to fix it."""
