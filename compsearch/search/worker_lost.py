"""The Ray errors that mean a worker is gone, not that what it ran failed (apart from `errors`, which the
command line reads before Ray is imported)."""
from ray.exceptions import OutOfMemoryError, RayActorError

# Killed, its node lost, or stopped by Ray's memory monitor (the node ran low on memory, whoever used it).
WORKER_LOST = (RayActorError, OutOfMemoryError)
