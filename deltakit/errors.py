"""Exceptions raised by deltakit.

Every error a user can cause derives from :class:`DeltakitError`; the command line turns them into a
one-line message and a non-zero exit code (``exit_code`` below) instead of a traceback.
"""

from __future__ import annotations


class DeltakitError(Exception):
    """Base class of the errors deltakit raises on bad input or damaged data."""

    exit_code = 1


class UsageError(DeltakitError):
    """Arguments that do not make sense together (bad ratio, unknown option value...)."""

    exit_code = 2


class UnknownCodecError(UsageError):
    """A codec name that no registered codec carries."""


class ConfigError(UsageError):
    """An unknown or badly typed codec config field."""


class BudgetError(UsageError):
    """A size budget the codec cannot reach on the given tensors."""


class FormatError(DeltakitError):
    """A delta or checkpoint on disk that is not in a form deltakit can read."""

    exit_code = 3


class IntegrityError(FormatError):
    """A file whose hash or size differs from what its manifest records (corrupted or truncated)."""

    exit_code = 4


class BaseMismatchError(DeltakitError):
    """A delta applied to a base other than the one it was made from."""

    exit_code = 5


class TensorMismatchError(DeltakitError):
    """Missing or extra tensors, or a shape/dtype that differs from what was expected."""

    exit_code = 6


class NonFiniteError(DeltakitError):
    """NaN or Inf values in an input tensor."""

    exit_code = 7


class RegistryError(DeltakitError):
    """A registry operation that cannot be carried out (conflicting name, base still in use, bad layout...)."""

    exit_code = 8


class NotFoundError(RegistryError):
    """A delta, tag, base or blob that the registry does not hold."""

    exit_code = 9
