"""Token ids on a command line, and a revoke during a slow token lookup."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from ingest.api import auth
from ingest.store import tokens
from ingest.store.tokens import Role, TokenRow


def test_a_new_token_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # One random id in 64 starts with '-'; argparse takes it for an option.
    drawn = iter(["-Q2x9aB7kLmN", "-AAAAAAAAAAA", "Q2x9aB7-kLmN", "s" * 43])
    monkeypatch.setattr(tokens.secrets, "token_urlsafe", lambda n: next(drawn))
    token_id, secret, text = tokens.new_token()
    assert token_id == "Q2x9aB7-kLmN" and secret == "s" * 43
    assert tokens.parse(text) == (token_id, secret)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # An id that starts with '-' is moved behind '--'.
        (["token", "revoke", "-Q2x9aB7kLmN"], ["token", "revoke", "--", "-Q2x9aB7kLmN"]),
        (
            ["token", "revoke", "-Q2x9aB7kLmN", "--database-url", "postgresql://h/db"],
            ["token", "revoke", "--database-url", "postgresql://h/db", "--", "-Q2x9aB7kLmN"],
        ),
        (
            ["--log-level", "DEBUG", "token", "revoke", "--Q2x9aB7kLm"],
            ["--log-level", "DEBUG", "token", "revoke", "--", "--Q2x9aB7kLm"],
        ),
        # Everything else as it is.
        (["token", "revoke", "Q2x9aB7-kLmN"], ["token", "revoke", "Q2x9aB7-kLmN"]),
        (["token", "revoke", "--", "-Q2x9aB7kLmN"], ["token", "revoke", "--", "-Q2x9aB7kLmN"]),
        (["token", "list", "-Q2x9aB7kLmN"], ["token", "list", "-Q2x9aB7kLmN"]),
        (["token", "revoke", "--database-u"], ["token", "revoke", "--database-u"]),
        (
            ["token", "revoke", "--token-pepper", "-peppery1234", "Q2x9aB7-kLmN"],
            ["token", "revoke", "--token-pepper", "-peppery1234", "Q2x9aB7-kLmN"],
        ),
        (["serve", "--listen", "x"], ["serve", "--listen", "x"]),
    ],
)
def test_cli_args(args: list[str], expected: list[str]) -> None:
    assert tokens.cli_args(args) == expected


def test_the_revoke_command_parses_an_id_that_starts_with_a_dash() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    tokens.add_cli(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(tokens.cli_args(["token", "revoke", "-Q2x9aB7kLmN"]))
    assert (ns.command, ns.token_command, ns.token_id) == ("token", "revoke", "-Q2x9aB7kLmN")


class SlowStore:
    """A token store whose lookup reads the row, then takes `delay_s` of the
    verifier's clock to answer (a slow database)."""

    pepper = ""

    def __init__(self, now: list[float], delay_s: float) -> None:
        self.now = now
        self.delay_s = delay_s
        self.lookups = 0
        token_id, secret, self.text = tokens.new_token()
        stamp = datetime.now(UTC)
        row = TokenRow(token_id, "n", "ws", Role.WRITER, stamp, "cli", None, None, None)
        self.row = row
        self.hash = tokens.hash_secret(secret)

    async def lookup(self, token_id: str) -> tuple[TokenRow, bytes] | None:
        self.lookups += 1
        read = self.row
        self.now[0] += self.delay_s
        await asyncio.sleep(0)
        return read, self.hash

    async def touch(self, token_id: str, every_s: float = 60.0) -> None:
        return None


def test_a_revoke_during_a_slow_lookup_takes_effect_within_the_ttl_of_the_revoke() -> None:
    async def main() -> None:
        now = [1000.0]
        store = SlowStore(now, delay_s=4.0)
        v = auth.TokenVerifier(store, ttl_s=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
        await v.verify(store.text)  # read at 1000, answered at 1004
        # Revoked right after the read (at 1000), while the answer was on its way.
        store.row = replace(store.row, revoked_at=datetime.now(UTC))
        store.delay_s = 0.0
        now[0] = 1005.0  # the TTL after the revoke: the entry read at 1000 is stale
        with pytest.raises(auth.Denied) as denied:
            await v.verify(store.text)
        assert denied.value.reason == auth.REVOKED and store.lookups == 2
        await v.close()

    asyncio.run(main())
