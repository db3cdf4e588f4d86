"""Settings from the environment: every value that could not work is refused by name."""

from __future__ import annotations

import pytest

from execguard.protocol.errors import ConfigError
from execguard.server.settings import Settings


@pytest.mark.parametrize(("name", "raw"), [
    ("EXECGUARD_CHECKPOINT_INTERVAL_SECONDS", "inf"),  # sent on as JSON null: a crash loop
    ("EXECGUARD_CHECKPOINT_INTERVAL_SECONDS", "1e999"),
    ("EXECGUARD_CHECKPOINT_INTERVAL_SECONDS", "nan"),
    ("EXECGUARD_CHECKPOINT_INTERVAL_SECONDS", "0.001"),
    ("EXECGUARD_TOKEN_TTL_SECONDS", "99999999999999999999999"),  # beyond 64 bits
    ("EXECGUARD_TOKEN_TTL_SECONDS", "9223372036854775807"),  # past time_t: 503s as faults
    ("EXECGUARD_TOKEN_TTL_SECONDS", "0"),
    ("EXECGUARD_IDEMPOTENCY_TTL_SECONDS", "9223372036854775807"),
    ("EXECGUARD_MAX_BODY_BYTES", "99999999999999"),
    ("EXECGUARD_PORT", "99999"),
    ("EXECGUARD_PORT", "abc"),
])
def test_a_value_that_could_not_work_is_refused_by_name(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=f"setting {name} has value"):
        Settings.from_env({name: raw})


def test_values_in_range_are_read_and_flags_win() -> None:
    env = {"EXECGUARD_PORT": "9000", "EXECGUARD_HOST": "0.0.0.0",
           "EXECGUARD_TOKEN_TTL_SECONDS": str(90 * 86400),
           "EXECGUARD_CHECKPOINT_INTERVAL_SECONDS": "3600"}
    settings = Settings.from_env(env)
    assert (settings.port, settings.host, settings.token_ttl_seconds,
            settings.checkpoint_interval_seconds) == (9000, "0.0.0.0", 90 * 86400, 3600.0)
    assert Settings.from_env(env, port=None, host=None).port == 9000  # a flag not given
    assert Settings.from_env(env, port=9100).port == 9100


@pytest.mark.parametrize("authority", ["my authority", "a+b", "tab\there", "line\nbreak"])
def test_an_authority_id_that_could_name_no_checkpoint_key_is_refused(authority: str) -> None:
    # Accepted, the gateway started, signed receipts, and then failed every checkpoint.
    with pytest.raises(ConfigError, match="setting EXECGUARD_AUTHORITY_ID has value"):
        Settings.from_env({"EXECGUARD_AUTHORITY_ID": authority})


@pytest.mark.parametrize("overrides", [{"host": ""}, {"host": "  "}, {"port": 99999},
                                       {"port": -5}])
def test_a_listen_flag_that_could_not_work_is_refused(overrides: dict[str, object]) -> None:
    # An empty --host listened on every interface; a port out of range was a traceback.
    with pytest.raises(ConfigError, match=r"--host|--port"):
        Settings.from_env({}, **overrides)
