"""deltaserve's compressor: a fine-tune's delta against the base -> a compact, verifiable artifact.

Public API (contract C): compress, check_compatible, base_fingerprint, load_artifact, verify_artifact, Artifact,
ModuleDelta, CompressionReport and the typed errors.
"""

from compressor.artifact import Artifact, ModuleDelta, load_artifact, verify_artifact
from compressor.checkpoint import base_fingerprint, check_compatible
from compressor.errors import (
    ArtifactError,
    CorruptArtifactError,
    IncompatibleCheckpointError,
    InvalidArtifactError,
    UnsupportedVersionError,
    WrongBaseError,
)
from compressor.pipeline import CompressionReport, ModuleReport, compress

__all__ = [
    "Artifact",
    "ArtifactError",
    "CompressionReport",
    "CorruptArtifactError",
    "IncompatibleCheckpointError",
    "InvalidArtifactError",
    "ModuleDelta",
    "ModuleReport",
    "UnsupportedVersionError",
    "WrongBaseError",
    "base_fingerprint",
    "check_compatible",
    "compress",
    "load_artifact",
    "verify_artifact",
]
