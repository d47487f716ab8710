"""The ``clues`` command: the composition root that wires `scoring` (and later the agent and coordinator) into a CLI.

It is the only package that reads the environment for the scoring steps (``CLUES_CACHE_DIR``, offline flags).
"""
