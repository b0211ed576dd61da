"""Exceptions with messages meant for the user: what is wrong and what to do."""


class VLSMError(Exception):
    """Base class for errors the GUI and CLI show as plain messages."""


class ModelNotFoundError(VLSMError):
    """A model spec names nothing that can be loaded here."""


class UnsafeWeightsError(VLSMError):
    """Weights are only in a pickle-based format; we load safetensors only."""


class TrainingError(VLSMError):
    """Training cannot start or had to stop (bad data, NaN loss, unwritable output)."""
