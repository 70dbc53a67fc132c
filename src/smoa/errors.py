"""The one exception tree of smoa.

Every error smoa raises on purpose derives from :class:`SmoaError`, so callers can catch the family or a
single leaf. Messages name the offending field in backticks and show the bad value::

    SmoaError
    ├── ConfigError                 (also ValueError)   a config field is unknown, of the wrong type or out of range
    ├── InvalidInputError           (also ValueError)   bad argument to an API call (tags, query, metadata, rank ...)
    ├── AdapterNotFoundError        (also KeyError)     unknown adapter id
    ├── CapacityError                                   `max_adapters` would be exceeded
    ├── InvalidAdapterError         (also ValueError)   weights that do not form a valid LoRA adapter
    │   ├── ProfileMismatchError                        module names or shapes do not fit the base-model profile
    │   └── NonFiniteWeightsError                       NaN or Inf in a tensor
    ├── CorruptAdapterError                             stored bytes fail their checksum or do not parse
    ├── StorageError                (also OSError)      the database or a weight file could not be written/read
    ├── LibraryLockedError                              another process holds the library for writing
    ├── CacheFullError                                  pin refused: pinned entries hold every cache slot
    ├── CompositionError            (also ValueError)   composite adapter cycles, bad members, bad merge arguments
    └── UnsafeAdapterFileError      (also ValueError)   a foreign adapter file/directory is refused (all problems listed)
"""

from __future__ import annotations


class SmoaError(Exception):
    """Base class of every error raised by smoa."""


class ConfigError(SmoaError, ValueError):
    """A configuration field is unknown, has the wrong type, or is out of range."""


class InvalidInputError(SmoaError, ValueError):
    """An argument of an API call is invalid (names the argument and the bad value)."""


class AdapterNotFoundError(SmoaError, KeyError):
    """No adapter with this id exists in the library."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "adapter not found"


class CapacityError(SmoaError):
    """Adding adapters would exceed `max_adapters`."""


class InvalidAdapterError(SmoaError, ValueError):
    """Weights do not form a valid LoRA adapter."""


class ProfileMismatchError(InvalidAdapterError):
    """Module names or tensor shapes do not fit the base-model profile."""


class NonFiniteWeightsError(InvalidAdapterError):
    """A weight tensor holds NaN or Inf."""


class CorruptAdapterError(SmoaError):
    """Stored adapter bytes fail their checksum or cannot be parsed."""


class StorageError(SmoaError, OSError):
    """The catalog or a weight file could not be read or written (disk full, I/O error, ...)."""


class LibraryLockedError(SmoaError):
    """Another process holds the library directory's write lock."""


class CacheFullError(SmoaError):
    """A pin refused: pinned entries already hold every slot of the cache (reads of other adapters still work,
    uncached)."""


class CompositionError(SmoaError, ValueError):
    """A composite adapter or merge request is invalid (cycle, unknown member, bad weights ...)."""


class UnsafeAdapterFileError(SmoaError, ValueError):
    """A foreign adapter file or directory is refused; the message lists every problem found."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"refused adapter file {path!r}: {len(self.problems)} problem(s)\n{lines}")
