"""The registry: one base plus many deltas, content-addressed, embedded by default, S3 to scale out.

>>> from deltakit.registry import Registry
>>> reg = Registry.open()                      # $DELTAKIT_HOME/registry or the user data dir
>>> reg.push("out/chat-delta", "chat:v1")
>>> path = reg.resolve_delta("chat:v1")         # a verified directory for apply
"""

from deltakit.registry.blobstore import BlobStore, LocalBlobStore
from deltakit.registry.names import (
    DEFAULT_TAG,
    DeltaRef,
    InvalidNameError,
    parse_ref,
    validate_name,
    validate_tag,
)
from deltakit.registry.paths import default_registry_path
from deltakit.registry.records import BaseInfo, DeltaInfo, GcReport, Problem, SyncReport, VerifyReport
from deltakit.registry.registry import Registry

__all__ = [
    "DEFAULT_TAG",
    "BaseInfo",
    "BlobStore",
    "DeltaInfo",
    "DeltaRef",
    "GcReport",
    "InvalidNameError",
    "LocalBlobStore",
    "Problem",
    "Registry",
    "SyncReport",
    "VerifyReport",
    "default_registry_path",
    "parse_ref",
    "validate_name",
    "validate_tag",
]
