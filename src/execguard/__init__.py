"""ExecGuard: execution governance for AI agents and automation.

No PERMIT, no execution. See README.md for the quick start and
docs/PROTOCOL.md for the wire contract.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
