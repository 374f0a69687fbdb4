"""Fixtures of the retrieve stage's tests."""

import asyncio

import pytest


@pytest.fixture
def connects(monkeypatch) -> list:
    """Every address the event loop is asked to connect to, recorded (connections still happen)."""
    seen: list = []
    original = asyncio.selector_events.BaseSelectorEventLoop.sock_connect

    async def recording(self, sock, address):
        seen.append(address)
        return await original(self, sock, address)

    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", recording)
    return seen
