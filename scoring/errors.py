"""The `ScoringError` hierarchy.

Every error passes all of its arguments to ``super().__init__`` so that it pickles (Celery ships errors between
processes). Domain errors also subclass the matching built-in, so callers may catch ``ValueError`` or
``FileNotFoundError`` without knowing this package.
"""

from __future__ import annotations


class ScoringError(Exception):
    """Base class of every error raised by `scoring`."""


class ConfigError(ScoringError, ValueError):
    """A configuration value is invalid (names the field)."""


class ShapeMismatchError(ScoringError, ValueError):
    """Arrays or tensors do not have the shapes an operation needs."""


class IncompatibleArtifactError(ScoringError, ValueError):
    """Two artefacts were made under different specs (projection, model or LoRA fingerprint)."""


class DataError(ScoringError, ValueError):
    """A data file or record is malformed; the message names the file and line."""


class ModelNotFoundError(ScoringError, FileNotFoundError):
    """A model could not be found locally; the message says how to install it."""
