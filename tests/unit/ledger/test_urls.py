"""Database URLs shown to people: never their password."""

from __future__ import annotations

import pytest

from execguard.ledger import redact_url


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://eg:s3cret@db.internal:5432/ledger", "postgresql://eg:***@db.internal:5432/ledger"),
    ("postgresql://eg@db/ledger?password=s3cret&sslmode=require",
     "postgresql://eg@db/ledger?password=***&sslmode=require"),
    ("postgresql://eg:a%40b@db/x?PASSWORD=s3cret", "postgresql://eg:***@db/x?password=***"),
    ("postgresql://db/ledger", "postgresql://db/ledger"),
    ("postgresql://eg:s3cret@db:notaport/x", "postgresql://eg:***@db:notaport/x"),
    ("postgresql://eg:s3cret@[::1/x", "postgresql://..."),
    ("https://user:pw@gateway.example/", "https://user:***@gateway.example/"),
])
def test_a_password_is_never_shown(url: str, shown: str) -> None:
    assert redact_url(url) == shown
