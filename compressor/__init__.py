"""deltaserve's compressor: a fine-tune's delta against the base -> a compact, verifiable artifact.

Public API (contract C): compress, check_compatible, base_fingerprint, load_artifact, verify_artifact, Artifact,
ModuleDelta, CompressionReport and the typed errors; METHODS (the compression methods a user picks) and
ADAPTER_METHODS (those that can compress a LoRA adapter), both from compressor.pipeline.
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
from compressor.pipeline import ADAPTER_METHODS, METHODS, CompressionReport, ModuleReport, compress

__all__ = [
    "ADAPTER_METHODS",
    "METHODS",
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
