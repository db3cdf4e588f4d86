"""The ExecGuard contract: pure, I/O-free models, canonical JSON, hashes, signatures.

Nothing in this package reads the clock, the environment, files or the network;
``protocol`` imports no other ExecGuard package.
"""

from execguard.protocol.canonical import canonical_json, canonical_sha256, sha256_hex
from execguard.protocol.outcome import (
    PROTOCOL_VERSION,
    Outcome,
    format_timestamp,
    parse_timestamp,
)
from execguard.protocol.receipt import check_receipt, receipt_hash, seal_receipt
from execguard.protocol.request import (
    ExecutionRequest,
    normalized_request,
    parse_execution_request,
    request_hash,
)
from execguard.protocol.signing import Signer, key_id_for
from execguard.protocol.token import issue_execution_token

__all__ = [
    "PROTOCOL_VERSION",
    "ExecutionRequest",
    "Outcome",
    "Signer",
    "canonical_json",
    "canonical_sha256",
    "check_receipt",
    "format_timestamp",
    "issue_execution_token",
    "key_id_for",
    "normalized_request",
    "parse_execution_request",
    "parse_timestamp",
    "receipt_hash",
    "request_hash",
    "seal_receipt",
    "sha256_hex",
]
