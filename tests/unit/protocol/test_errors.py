from execguard.protocol import errors as e


def test_exception_hierarchy() -> None:
    assert issubclass(e.MalformedRequest, e.RequestError)
    assert issubclass(e.UnknownSurface, e.RequestError)
    assert issubclass(e.IdempotencyKeyReuse, e.RequestError)
    assert issubclass(e.Forbidden, e.AuthError)
    assert issubclass(e.StorageUnavailable, e.ServiceUnavailable)
    assert issubclass(e.NoSigningKey, e.ServiceUnavailable)
    assert issubclass(e.ReceiptHashMismatch, e.VerificationError)
    assert issubclass(e.SignatureInvalid, e.VerificationError)
    assert issubclass(e.CanonicalizationError, ValueError)
    # Verification failures and service trouble must never be mistaken for bad requests.
    assert not issubclass(e.VerificationError, e.RequestError)
    assert not issubclass(e.ServiceUnavailable, e.RequestError)
    assert not issubclass(e.AuthError, e.RequestError)
    for name in dir(e):
        obj = getattr(e, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, e.ExecGuardError), name


def test_messages_name_what_is_wrong() -> None:
    err = e.MalformedRequest("context.amount", "a number", "string 'ten'")
    assert str(err) == "context.amount: expected a number, got string 'ten'"
    assert "surfaces.toml" in e.UnknownSurface("paymnt.execute").diagnostics()
    assert str(e.BundleInvalid("bad type", file="surfaces.toml", line=7, key="x.type")) == \
        "surfaces.toml:7 [x.type]: bad type"
