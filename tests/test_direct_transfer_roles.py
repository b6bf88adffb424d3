"""Artifact uploads and downloads over the direct connections, under the roles that make them.

An upload is the agent's (it publishes the chunks on its own connection, pub-acks under its
inbox prefix); a download the operator's or the viewer's (the chunks' consumer is made on the
client connection, the chunks are pulled on a connection of the download's own). Each runs
here on a server that enforces broker/roles.py, logged in with the role's nkey, big enough
for the direct path (DIRECT_MIN_BYTES), and must go over that path, not a fallback.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainfleet.broker import objstore
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import Bundle
from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import TrainfleetError
from trainfleet.broker.roles import inbox_prefix
from trainfleet.broker.server import EmbeddedServer
from trainfleet.broker.settings import Settings
from trainfleet.controller.auth import AuthFiles, init_auth

SIZE = objstore.DIRECT_MIN_BYTES + 3 * (1 << 20) + 12345  # several chunks, the last one partial


@dataclass
class Fleet:
    server: EmbeddedServer
    auth: AuthFiles

    def settings(self, role: str) -> Settings:
        env = self.auth.role_env(role)
        return Settings(url=self.server.url, nkey=env["NATS_NKEY"], inbox_prefix=env["TRAINFLEET_INBOX_PREFIX"])


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    auth = init_auth(tmp_path / "auth", Settings().names)
    server = EmbeddedServer(tmp_path / "nats", extra_config=auth.server_include.read_text()).start()
    try:
        admin = await Broker.connect(
            Settings(url=server.url, nkey=str(auth.seed_path("admin")), inbox_prefix=inbox_prefix("admin")),
            provision=True,
        )
        await admin.close()
        yield Fleet(server, auth)
    finally:
        server.stop()


@pytest.fixture
def direct_calls(monkeypatch) -> list[str]:
    """Which direct transfers ran to the end ("put"/"get"), in order."""
    calls: list[str] = []
    real_push, real_pull = objstore.push_object, objstore.pull_object

    def push(*args, **kwargs):
        got = real_push(*args, **kwargs)
        calls.append("put")
        return got

    def pull(*args, **kwargs):
        got = real_pull(*args, **kwargs)
        calls.append("get")
        return got

    monkeypatch.setattr(objstore, "push_object", push)
    monkeypatch.setattr(objstore, "pull_object", pull)
    return calls


def make_bundle(path: Path, size: int = SIZE) -> Bundle:
    data = os.urandom(size)
    path.write_bytes(data)
    return Bundle(path=path, sha256=hashlib.sha256(data).hexdigest(), size=size)


async def test_an_agent_uploads_and_the_operator_and_viewer_download_over_the_direct_path(
    fleet, tmp_path, direct_calls, caplog
):
    # Given a bundle built by an agent, big enough for the direct path
    caplog.set_level(logging.INFO, logger="trainfleet.objstore")
    bundle = make_bundle(tmp_path / "bundle.tar.zst")
    # When the agent uploads it with its own nkey
    agent = await Broker.connect(fleet.settings("agent"))
    try:
        assert await Artifacts(agent).put(bundle) == bundle.sha256
    finally:
        await agent.close()
    # Then the operator and the viewer each download it whole, as themselves
    for role in ("operator", "viewer"):
        reader = await Broker.connect(fleet.settings(role))
        try:
            dest = await Artifacts(reader).get(bundle.sha256, tmp_path / role / "bundle.tar.zst")
        finally:
            await reader.close()
        assert dest.read_bytes() == bundle.path.read_bytes()
    # And every transfer went over its direct connection: no fallback was needed
    assert direct_calls == ["put", "get", "get"]
    assert "not possible" not in caplog.text


async def test_a_viewer_cannot_upload_over_the_direct_path_either(fleet, tmp_path, direct_calls):
    # Given a viewer (read-only) holding a bundle big enough for the direct path
    bundle = make_bundle(tmp_path / "bundle.tar.zst")
    viewer = await Broker.connect(fleet.settings("viewer"))
    try:
        # When it tries to upload it, the server refuses the chunks and the upload fails
        with pytest.raises(TrainfleetError):
            await Artifacts(viewer).put(bundle)
        # Then nothing is stored under the bundle's name
        assert await Artifacts(viewer).info(bundle.sha256) is None
    finally:
        await viewer.close()
    assert direct_calls == []


class FailingFile(io.FileIO):
    """A file that raises after ``fail_after`` reads (a bundle's disk going bad mid-upload)."""

    def __init__(self, path: Path, fail_after: int):
        super().__init__(path, "rb")
        self.reads_left = fail_after

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self.reads_left <= 0:
            raise OSError("simulated read error")
        self.reads_left -= 1
        return super().readinto(buffer)


async def test_an_agent_upload_that_fails_leaves_its_chunks_to_the_sweep_without_asking_to_purge(
    fleet, tmp_path, monkeypatch
):
    # Given an agent (it may not purge the artifacts stream) uploading a file that fails mid-way
    bundle = make_bundle(tmp_path / "bundle.tar.zst")
    purges: list[str] = []
    real_purge = objstore.ObjectStoreClient._purge

    async def spy(self, subject: str) -> None:
        purges.append(subject)
        await real_purge(self, subject)

    monkeypatch.setattr(objstore.ObjectStoreClient, "_purge", spy)
    agent = await Broker.connect(fleet.settings("agent"))
    try:
        store = Artifacts(agent).store
        # When the file's reads fail after two chunks, the read error is what the upload raises
        with FailingFile(bundle.path, fail_after=2) as fh, pytest.raises(OSError, match="simulated"):
            await store.put_stream(bundle.sha256, fh, purge_previous=False)
    finally:
        await agent.close()
    # Then the agent never sent a purge the server would refuse (it waited out a timeout for it)
    assert purges == []
    # And the chunks it left are stray: the controller's sweep (which may purge) removes them
    controller = await Broker.connect(fleet.settings("controller"))
    try:
        artifacts = Artifacts(controller)
        assert await artifacts.info(bundle.sha256) is None
        stray = await artifacts.stray(0)
        assert stray and sum(stray.values()) >= 1
        assert await artifacts.sweep(0) == stray
        assert await artifacts.stray(0) == {}
    finally:
        await controller.close()
