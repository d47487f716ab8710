"""``clues worker`` with every scored shard part slowed down by ``argv[1]`` seconds (for the kill -9 test only):
a real Celery worker process, only slower, so that the test can kill it in the middle of a scoring task."""

import sys
import time

from workers import pipeline

DELAY = float(sys.argv[1])
_trace_block = pipeline.trace_block


def _slow_trace_block(*args, **kwargs):
    time.sleep(DELAY)
    return _trace_block(*args, **kwargs)


pipeline.trace_block = _slow_trace_block

if __name__ == "__main__":
    from clues.cli import main

    sys.exit(main(["worker", *sys.argv[2:]]))
