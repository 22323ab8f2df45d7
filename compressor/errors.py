"""The compressor's typed errors; each is a ValueError so callers can treat bad input uniformly."""

from __future__ import annotations


class IncompatibleCheckpointError(ValueError):
    """The fine-tune cannot be compressed against this base: other architecture, missing or extra tensor,
    shape or dtype mismatch, not safetensors, unreadable or truncated file."""


class ArtifactError(ValueError):
    """An artifact cannot be used; the subclasses say why."""


class WrongBaseError(ArtifactError):
    """The artifact was made against another base (fingerprint or a tensor shape differs)."""


class CorruptArtifactError(ArtifactError):
    """The artifact's bytes are damaged: truncated, not safetensors, bad manifest, checksum mismatch."""


class InvalidArtifactError(ArtifactError):
    """The artifact parses and its checksum holds, but it cannot be served: a manifest field of the wrong
    type, a module with a missing, extra or mis-shaped tensor, a wrong dtype, a drop count or mask key
    out of range, or a non-finite or out-of-range value. The message names the module."""


class UnsupportedVersionError(ArtifactError):
    """The artifact's format version is not one this code reads."""


class AdapterError(ValueError):
    """A PEFT adapter cannot be imported on this base: an unsupported or malformed adapter_config.json field,
    a module the base lacks, factors that do not fit the base's shapes, an unreadable weights file.
    `field` names what is wrong (a config field, `adapter_config.json` or `adapter_model.safetensors`)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field
