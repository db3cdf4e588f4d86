"""The version of a policy bundle: a content address (docs/PROTOCOL.md, "Policy bundle version").

Pure, so an auditor can check that the policy files in an export are the
ones a receipt names, without the policy engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from execguard.protocol.canonical import canonical_sha256

__all__ = ["bundle_version"]


def bundle_version(files: Mapping[str, bytes]) -> str:
    """SHA-256 hex of the canonical JSON mapping each relative path to its SHA-256 hex."""
    return canonical_sha256({path: hashlib.sha256(data).hexdigest()
                             for path, data in files.items()})
