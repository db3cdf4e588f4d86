"""The data directory: the database, the signing keys, and first-run set-up.

Layout::

    <data>/execguard.db          the SQLite ledger (the embedded default)
    <data>/execguard.toml        settings written by ``init --db``: the PostgreSQL URL
    <data>/keys/<key id>.pem     Ed25519 private keys, mode 0600 (directory 0700)
    <data>/demo-api-key          the demo tenant's API key, mode 0600 (created by init)
    <data>/.init-unfinished      only while init runs, or after one that stopped half-way

With PostgreSQL, several gateway replicas share one database; each needs the
same ``keys`` directory (a copy, or a shared volume) to sign with the active key.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from execguard.arbiter import PolicyBundle, demo_bundle_path
from execguard.ledger import (
    ApiKeyRecord,
    SigningKeyRecord,
    SQLStore,
    is_postgres_url,
    open_ledger,
    redact_url,
)
from execguard.protocol.errors import ConfigError, NoSigningKey
from execguard.protocol.outcome import format_timestamp
from execguard.protocol.signing import Signer

__all__ = [
    "API_KEY_PREFIX",
    "DataDir",
    "InitResult",
    "SignerSource",
    "checked_database_url",
    "hash_api_key",
    "new_api_key",
    "now_text",
]

#: ExecGuard's API keys. Not ``tg_live_``/``tg_test_``: TrigGuard's SDK treats those specially.
API_KEY_PREFIX = "egk_"
ROLES = ("agent", "admin", "approver")
DEMO_TENANT = "demo"


def now_text() -> str:
    """The current time as a protocol timestamp."""
    return format_timestamp(datetime.now(UTC))


def new_api_key() -> str:
    """A fresh random API key (256 bits)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """Keys are stored as SHA-256 hex: they are random, so no slow hash is needed."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def checked_database_url(url: str, source: str) -> str:
    """``url`` if it is a PostgreSQL URL that parses; else a ConfigError without its password."""
    shown = redact_url(url)
    if not is_postgres_url(url):
        raise ConfigError(f"{source} {shown!r} is not a PostgreSQL URL "
                          "(postgresql://user@host:port/database)")
    try:
        hosts = urlsplit(url).netloc.rpartition("@")[2]
    except ValueError as exc:  # an IPv6 bracket left open
        raise ConfigError(f"{source} {shown!r}: {exc}") from None
    for host in hosts.split(","):  # libpq takes several: h1:5432,h2:5433
        port = host.rpartition("]")[2].partition(":")[2]  # past an IPv6 address
        if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"{source} {shown!r}: port {port!r} is not from 1 to 65,535")
    return url


class SignerSource:
    """Hands out the active signing key, checked again every ``recheck_seconds``.

    Each check reloads the key from its file: a rotation takes effect, and a key
    file that became unreadable (deleted, corrupted, a failing disk) stops all
    signing within a second (fail closed, 503) and resumes by itself once the
    file is readable again.
    """

    def __init__(self, datadir: DataDir, store: SQLStore, recheck_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._datadir = datadir
        self._store = store
        self._recheck = recheck_seconds
        self._clock = clock
        self._signer: Signer | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()

    def current(self) -> Signer:
        """The active key; :class:`NoSigningKey` when there is none or it cannot be read."""
        now = self._clock()
        signer = self._signer
        if signer is not None and now - self._checked < self._recheck:
            return signer
        with self._lock:
            active = [k.key_id for k in self._store.signing_keys() if k.status == "active"]
            if not active:
                self._signer = None
                raise NoSigningKey("no active signing key is published in the database")
            self._signer = None
            self._signer = self._datadir.load_signer(self._store)
            self._checked = now
            return self._signer


@dataclass(frozen=True)
class InitResult:
    """What ``init`` did: ``created`` is False when the directory was already set up."""

    created: bool
    data_dir: Path
    key_id: str
    api_key: str | None
    policy_version: str | None


class DataDir:
    """Paths and operations on one data directory.

    ``database`` (a ``postgresql://`` URL, from ``--db`` or ``EXECGUARD_DB``)
    overrides the one in ``execguard.toml``; with neither, the ledger is the
    directory's SQLite file.
    """

    def __init__(self, path: str | Path, database: str | None = None) -> None:
        self.path = Path(path)
        self._database = checked_database_url(database, "--db") if database else None

    @property
    def db_path(self) -> Path:
        """The SQLite ledger."""
        return self.path / "execguard.db"

    @property
    def config_path(self) -> Path:
        """Settings that ``init --db`` wrote (mode 0600: the URL may hold a password)."""
        return self.path / "execguard.toml"

    @property
    def database_url(self) -> str | None:
        """The PostgreSQL URL in use, or None for the embedded SQLite file."""
        if self._database is not None:
            return self._database
        if not self.config_path.exists():
            return None
        try:
            config = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {self.config_path}: {exc}") from None
        url = config.get("database", {}).get("url") if isinstance(
            config.get("database"), dict) else None
        if not isinstance(url, str):
            raise ConfigError(f"{self.config_path}: [database] url must be a PostgreSQL URL "
                              f"(postgresql://...), got {url!r}")
        return checked_database_url(url, f"{self.config_path}: [database] url")

    @property
    def ledger_location(self) -> str:
        """What :func:`~execguard.ledger.open_ledger` opens: the PostgreSQL URL or the file."""
        return self.database_url or str(self.db_path)

    @property
    def database_label(self) -> str:
        """Where the ledger is, for people (no password)."""
        url = self.database_url
        return redact_url(url) if url else str(self.db_path)

    @property
    def keys_dir(self) -> Path:
        """Private signing keys live here (mode 0700)."""
        return self.path / "keys"

    @property
    def demo_key_path(self) -> Path:
        """The demo API key written by ``init`` (mode 0600)."""
        return self.path / "demo-api-key"

    def exists(self) -> bool:
        """Whether ``init`` has run here."""
        return self.db_path.exists() or self.config_path.exists()

    def open_store(self) -> SQLStore:
        """Open the ledger; the directory must have been initialised."""
        if not self.exists():
            raise ConfigError(
                f"no ExecGuard data directory at {self.path}: run 'execguard init --data "
                f"{self.path}' first"
            )
        if self.init_marker.exists():
            raise ConfigError(f"'execguard init' of {self.path} did not finish: run it again "
                              "(it finishes the set-up)")
        return open_ledger(self.ledger_location)

    def _write_config(self, url: str) -> None:
        escaped = url.replace("\\", "\\\\").replace('"', '\\"')
        self._write_secret(self.config_path, (
            "# Written by 'execguard init'. Replicas share this database and keys/.\n"
            f'[database]\nurl = "{escaped}"\n').encode())

    def _write_secret(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def _new_key_file(self) -> Signer:
        self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        signer = Signer.generate()
        # The private key is on disk before its public half is published as active.
        self._write_secret(self.keys_dir / f"{signer.key_id}.pem", signer.private_pem())
        return signer

    def create_signing_key(self, store: SQLStore) -> Signer:
        """Generate a key, write it (0600), then publish its public half as active."""
        signer = self._new_key_file()
        store.add_signing_key(SigningKeyRecord(signer.key_id, signer.public_pem, "active",
                                               now_text()))
        return signer

    def rotate_signing_key(self, store: SQLStore) -> tuple[Signer, list[str]]:
        """A new active key; the old ones stay published as ``retired`` and keep verifying."""
        signer = self._new_key_file()
        retired = store.rotate_signing_key(
            SigningKeyRecord(signer.key_id, signer.public_pem, "active", now_text()))
        return signer, retired

    def load_signer(self, store: SQLStore) -> Signer:
        """The active signing key; :class:`NoSigningKey` if it is missing or unreadable."""
        active = [k for k in store.signing_keys() if k.status == "active"]
        if not active:
            raise NoSigningKey("no active signing key is published in the database")
        record = active[-1]
        path = self.keys_dir / f"{record.key_id}.pem"
        try:
            signer = Signer.from_pem(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise NoSigningKey(f"signing key {record.key_id} cannot be read from {path}: "
                               f"{exc}") from exc
        if signer.key_id != record.key_id:
            raise NoSigningKey(f"{path} does not hold key {record.key_id}")
        return signer

    def signer_source(self, store: SQLStore, recheck_seconds: float = 1.0) -> SignerSource:
        """The active signing key, re-checked so a rotation takes effect without a restart."""
        return SignerSource(self, store, recheck_seconds)

    def create_api_key(self, store: SQLStore, tenant: str, role: str = "agent",
                       label: str | None = None, groups: tuple[str, ...] = ()) -> str:
        """Create and store (hashed) a new API key for an existing tenant; return its text."""
        if role not in ROLES:
            raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if groups and role != "approver":
            raise ConfigError("only approver keys belong to approver groups (--role approver)")
        for group in groups:
            if not group or not all(c.isalnum() or c in "-_" for c in group):
                raise ConfigError(f"group {group!r} is not a group name")
        if not store.tenant_exists(tenant):
            raise ConfigError(f"tenant {tenant!r} does not exist")
        key = new_api_key()
        store.add_api_key(ApiKeyRecord(hash_api_key(key), tenant, role, label, now_text(),
                                       tuple(groups)))
        return key

    @property
    def init_marker(self) -> Path:
        """Present while ``init`` runs, and after one that stopped half-way."""
        return self.path / ".init-unfinished"

    def initialise(self) -> InitResult:
        """Create everything on first run; on a directory set up before, change nothing.

        Runs under a lock on the directory, so inits run at once set it up once and
        each prints its API key; an init that stopped half-way (a full disk, a kill)
        left :attr:`init_marker`, and the next one finishes the set-up.
        """
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(self.path):
            if self.exists() and not self.init_marker.exists():
                return self._already_set_up()
            self.path.chmod(0o700)  # it may have existed, empty, open to others
            if not self.init_marker.exists():
                self._write_secret(self.init_marker, b"")
            result = self._set_up()
            self.init_marker.unlink()
            return result

    def _already_set_up(self) -> InitResult:
        store = self.open_store()
        try:
            keys = store.signing_keys()
            version = store.active_bundle_version(DEMO_TENANT)
        finally:
            store.close()
        demo_key = (self.demo_key_path.read_text().strip()
                    if self.demo_key_path.exists() else None)
        return InitResult(False, self.path, keys[-1].key_id if keys else "", demo_key,
                          version)

    def _set_up(self) -> InitResult:
        """Each step is skipped when an earlier, unfinished init already did it."""
        url = self.database_url
        store = open_ledger(self.ledger_location, migrate=True)
        try:
            if url is not None and not self.config_path.exists():
                if store.signing_keys():
                    raise ConfigError(
                        f"the database {redact_url(url)} is already set up by another data "
                        "directory: give each replica a copy of that directory (its keys/ "
                        "and execguard.toml) instead of running init again")
                self._write_config(url)
            active = [k.key_id for k in store.signing_keys() if k.status == "active"]
            key_id = active[-1] if active else self.create_signing_key(store).key_id
            now = now_text()
            store.create_tenant(DEMO_TENANT, now)
            version = store.active_bundle_version(DEMO_TENANT)
            if version is None:
                bundle = PolicyBundle.from_directory(demo_bundle_path())
                store.put_bundle(DEMO_TENANT, bundle.version, bundle.files, now)
                store.activate_bundle(DEMO_TENANT, bundle.version, now)
                version = bundle.version
            api_key = self._demo_api_key(store)
        finally:
            store.close()
        return InitResult(True, self.path, key_id, api_key, version)

    def _demo_api_key(self, store: SQLStore) -> str:
        """The demo admin key: written to its file first, then stored (hashed)."""
        key = (self.demo_key_path.read_text().strip()
               if self.demo_key_path.exists() else "")
        if not (key.startswith(API_KEY_PREFIX) and len(key) == len(new_api_key())):
            self.demo_key_path.unlink(missing_ok=True)  # cut short while being written
            key = new_api_key()
            self._write_secret(self.demo_key_path, (key + "\n").encode())
        if all(k.key_hash != hash_api_key(key) for k in store.api_keys(DEMO_TENANT)):
            store.add_api_key(ApiKeyRecord(hash_api_key(key), DEMO_TENANT, "admin", "demo",
                                           now_text()))
        return key


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory`` (flock), released when the block ends."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
