"""A provisioned stack with filed and staged sessions, served by the real API handler over HTTP.

One ``ApiWorld`` per test module (module-scoped): provisioning and assembling are the slow parts,
and the API only reads, so tests share the sessions and each asserts exact bytes and fields.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers_staging as staging
import pytest

from oneoff_audit import keys
from oneoff_audit.assemble import assemble_session
from oneoff_audit.aws import client
from oneoff_audit.config import AssemblerConfig
from oneoff_audit.local import load_handler
from oneoff_audit.models import FiledLog
from oneoff_audit.provision import provision

CLI = str(Path(sys.executable).parent / "oneoff-audit")
TOKENS = {
    "admin-token": {"sub": "auditor-1", "name": "Ida Auditor", "custom:audit_apps": "*", "custom:audit_admin": "true"},
    "reader-token": {"sub": "u-reader", "custom:audit_apps": "app1"},
    "other-token": {"sub": "u-other", "custom:audit_apps": "app2"},
}


@dataclass
class ApiWorld:
    """Everything a test needs: resources, the API URL, filed sessions and their plaintexts."""

    endpoint: str
    bucket: str
    kms_key_id: str
    signing_key_id: str
    api_url: str
    filed: dict[str, FiledLog] = field(default_factory=dict)
    plaintext: dict[str, bytes] = field(default_factory=dict)
    output: dict[str, bytes] = field(default_factory=dict)

    def env(self, token: str | None = "admin-token", **extra: str) -> dict[str, str]:
        """Environment for CLI subprocesses talking to this world."""
        env = {**os.environ, "AWS_ENDPOINT_URL": self.endpoint, "AUDIT_BUCKET": self.bucket,
               "AUDIT_KMS_KEY_ID": self.kms_key_id, "ONEOFF_AUDIT_API_URL": self.api_url, **extra}
        if token:
            env["ONEOFF_AUDIT_TOKEN"] = token
        else:
            env.pop("ONEOFF_AUDIT_TOKEN", None)
        return env

    def get(self, path: str, token: str | None = "admin-token") -> tuple[int, dict[str, str], bytes]:
        """GET over real HTTP: (status, headers, body)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.api_url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers.items()), err.read()

    def get_json(self, path: str, token: str | None = "admin-token") -> tuple[int, Any]:
        status, _, body = self.get(path, token)
        return status, json.loads(body)

    def stored(self, app: str, sid: str) -> bytes:
        """The exact bytes of the filed log version."""
        filed = self.filed[f"{app}/{sid}"]
        return client("s3").get_object(Bucket=self.bucket, Key=filed.log_key,
                                       VersionId=filed.log_version_id)["Body"].read()


def file_session(world: ApiWorld, app: str, sid: str, texts: list[bytes | str], started_at: str,
                 actor: str = "u-42", stream_in: list[bytes] | None = None, status: str = "succeeded",
                 code: int | None = 0) -> FiledLog:
    """Stage a session (one chunk per text) and file it with the real assembler."""
    batches = [staging.output_events([text], start=n * 0.5) for n, text in enumerate(texts)]
    if stream_in:
        batches[0] = batches[0] + staging.output_events(stream_in, start=0.3, step=0.01, stream="i")
    opened = staging.session_header(app, sid, started_at=started_at,
                                    actor={"id": actor, "name": None, "type": "user", "source_ip": None})
    chunks = staging.build_chunks(app, sid, batches)
    staging.stage(world.bucket, chunks, opened=opened, closed=staging.close_marker(chunks, status=status, code=code))
    filed = assemble_session(AssemblerConfig.from_env(), app, sid)
    world.filed[f"{app}/{sid}"] = filed
    world.plaintext[f"{app}/{sid}"] = staging.read_log(world.bucket, app, sid, world.kms_key_id,
                                                       filed.log_version_id)
    world.output[f"{app}/{sid}"] = b"".join(t.encode() if isinstance(t, str) else t for t in texts)
    return filed


def stage_pending(world: ApiWorld, app: str, sid: str, closed: bool) -> None:
    """A session still in staging: recording (no close marker) or waiting for the assembler."""
    chunks = staging.build_chunks(app, sid, [staging.output_events(["pending\r\n"])])
    staging.stage(world.bucket, chunks, opened=staging.session_header(app, sid), closed=closed)


@pytest.fixture(scope="module")
def api_world(moto_endpoint: str) -> Iterator[ApiWorld]:
    """Fresh resources, the API handler on a loopback port, and an empty world to file sessions into."""
    suffix = uuid.uuid4().hex[:10]
    res = provision(bucket=f"api-{suffix}", queue_name=f"api-{suffix}")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in res.env().items():
            mp.setenv(name, value)
        mp.delenv("INLINE_MAX_BYTES", raising=False)
        mp.delenv("PRESIGN_TTL", raising=False)
        from oneoff_audit.api.httpbridge import serve

        server = serve(load_handler("api"), "127.0.0.1", 0, TOKENS)
        try:
            yield ApiWorld(moto_endpoint, res.bucket, res.kms_key_id, res.signing_key_id, server.url)
        finally:
            server.shutdown()


def access_records(world: ApiWorld, app: str, sid: str) -> list[dict[str, Any]]:
    """The access records stored in the bucket (not through the API)."""
    s3 = client("s3")
    listed = s3.list_objects_v2(Bucket=world.bucket, Prefix=keys.access_prefix(app, sid)).get("Contents", [])
    return [json.loads(s3.get_object(Bucket=world.bucket, Key=o["Key"])["Body"].read()) for o in listed]
