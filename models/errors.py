"""Errors the engine raises; each message says what went wrong and what to do."""

from __future__ import annotations


class FineTuneError(Exception):
    """Base class: a problem a user can act on (bad data, spec, weights)."""


class UnknownBackboneError(FineTuneError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class WeightsNotFoundError(FineTuneError):
    pass


class WeightsMismatchError(FineTuneError):
    pass


class DatasetError(FineTuneError):
    pass


class ArchiveError(DatasetError):
    """An archive that cannot be unpacked safely (damaged, hostile or over a limit)."""


class ArchiveTooLarge(ArchiveError):
    """An archive that unpacks to more bytes than allowed."""


class NonFiniteLossError(FineTuneError):
    pass


class OutputExistsError(FineTuneError):
    pass


class TrainingCancelled(FineTuneError):
    pass


class ResourceError(FineTuneError):
    """A run that cannot fit the device it would run on; the message has the numbers."""


class RankGroupLost(Exception):
    """A rank of a data-parallel run died (killed, or its device failed): the whole group
    ended, and the run is retried from its last checkpoint like a killed worker's."""
