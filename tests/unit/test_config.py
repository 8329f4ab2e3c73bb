"""Typed configuration from the environment: defaults, required settings, malformed values, caps."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator, Mapping

import pytest

from oneoff_audit import config
from oneoff_audit.config import ApiConfig, AssemblerConfig, ConfigError, SweeperConfig

pytestmark = pytest.mark.unit

CONFIGS = [cls for _, cls in inspect.getmembers(config, inspect.isclass)
           if dataclasses.is_dataclass(cls) and hasattr(cls, "from_env")]
BASE = {
    "AUDIT_BUCKET": "audit-bucket",
    "AUDIT_KMS_KEY_ID": "arn:aws:kms:us-east-1:123456789012:key/k",
    "AUDIT_SIGNING_KEY_ID": "arn:aws:kms:us-east-1:123456789012:key/s",
    "ASSEMBLY_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/assembly",
}


class Recording(Mapping[str, str]):
    """An environment that remembers which variables were looked up."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.values[key]

    def get(self, key, default=None):
        self.read.add(key)
        return self.values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("configuration must not scan the whole environment")

    def __len__(self) -> int:
        return len(self.values)


def test_all_config_classes_are_covered():
    assert {AssemblerConfig, SweeperConfig, ApiConfig} <= set(CONFIGS)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_env_lists_exactly_what_is_read(cls):
    env = Recording(dict(BASE))
    cls.from_env(env)
    assert env.read == set(cls.ENV)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_frozen(cls):
    cfg = cls.from_env(dict(BASE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bucket = "other"


def test_defaults():
    assert AssemblerConfig.from_env({"AUDIT_BUCKET": "b", "AUDIT_KMS_KEY_ID": "k"}) == AssemblerConfig(
        bucket="b", kms_key_id="k", staging_prefix="staging/", signing_key_id=None, max_attempts=5)
    assert SweeperConfig.from_env({"AUDIT_BUCKET": "b", "ASSEMBLY_QUEUE_URL": "q"}) == SweeperConfig(
        bucket="b", queue_url="q", staging_prefix="staging/", abandon_after=3600)
    assert ApiConfig.from_env({"AUDIT_BUCKET": "b", "AUDIT_KMS_KEY_ID": "k"}) == ApiConfig(
        bucket="b", kms_key_id="k", staging_prefix="staging/", inline_max_bytes=1 << 20, presign_ttl=300,
        signing_key_id=None)


def test_every_setting_is_read():
    env = {**BASE, "AUDIT_STAGING_PREFIX": "audit/staging/", "ASSEMBLE_MAX_ATTEMPTS": "7", "ABANDON_AFTER": "600",
           "INLINE_MAX_BYTES": "1000", "PRESIGN_TTL": "120"}
    assert AssemblerConfig.from_env(env) == AssemblerConfig(
        bucket="audit-bucket", kms_key_id=BASE["AUDIT_KMS_KEY_ID"], staging_prefix="audit/staging/",
        signing_key_id=BASE["AUDIT_SIGNING_KEY_ID"], max_attempts=7)
    assert SweeperConfig.from_env(env) == SweeperConfig(
        bucket="audit-bucket", queue_url=BASE["ASSEMBLY_QUEUE_URL"], staging_prefix="audit/staging/",
        abandon_after=600)
    assert ApiConfig.from_env(env) == ApiConfig(
        bucket="audit-bucket", kms_key_id=BASE["AUDIT_KMS_KEY_ID"], staging_prefix="audit/staging/",
        inline_max_bytes=1000, presign_ttl=120, signing_key_id=BASE["AUDIT_SIGNING_KEY_ID"])


def test_reads_os_environ_by_default(monkeypatch):
    for name in ("AUDIT_STAGING_PREFIX", "ASSEMBLE_MAX_ATTEMPTS", "AUDIT_SIGNING_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AUDIT_BUCKET", "from-env")
    monkeypatch.setenv("AUDIT_KMS_KEY_ID", "key-from-env")
    assert AssemblerConfig.from_env() == AssemblerConfig(bucket="from-env", kms_key_id="key-from-env")


@pytest.mark.parametrize(("cls", "missing"), [
    (AssemblerConfig, "AUDIT_BUCKET"), (AssemblerConfig, "AUDIT_KMS_KEY_ID"),
    (SweeperConfig, "AUDIT_BUCKET"), (SweeperConfig, "ASSEMBLY_QUEUE_URL"),
    (ApiConfig, "AUDIT_BUCKET"), (ApiConfig, "AUDIT_KMS_KEY_ID"),
])
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_required_settings(cls, missing, how):
    env = dict(BASE)
    if how == "absent":
        del env[missing]
    else:
        env[missing] = ""
    with pytest.raises(ConfigError) as info:
        cls.from_env(env)
    assert str(info.value) == f"environment variable {missing} is required"


def test_empty_optional_settings_take_their_default():
    env = {**BASE, "AUDIT_STAGING_PREFIX": "", "ASSEMBLE_MAX_ATTEMPTS": "", "AUDIT_SIGNING_KEY_ID": "",
           "PRESIGN_TTL": "", "INLINE_MAX_BYTES": ""}
    assert AssemblerConfig.from_env(env) == AssemblerConfig(bucket="audit-bucket",
                                                            kms_key_id=BASE["AUDIT_KMS_KEY_ID"])
    api = ApiConfig.from_env(env)
    assert (api.staging_prefix, api.presign_ttl, api.inline_max_bytes, api.signing_key_id) == (
        "staging/", 300, 1 << 20, None)


@pytest.mark.parametrize(("cls", "name", "raw", "message"), [
    (AssemblerConfig, "ASSEMBLE_MAX_ATTEMPTS", "abc", "ASSEMBLE_MAX_ATTEMPTS must be an integer, got 'abc'"),
    (AssemblerConfig, "ASSEMBLE_MAX_ATTEMPTS", "1.5", "ASSEMBLE_MAX_ATTEMPTS must be an integer, got '1.5'"),
    (AssemblerConfig, "ASSEMBLE_MAX_ATTEMPTS", "0x10", "ASSEMBLE_MAX_ATTEMPTS must be an integer, got '0x10'"),
    (AssemblerConfig, "ASSEMBLE_MAX_ATTEMPTS", " ", "ASSEMBLE_MAX_ATTEMPTS must be an integer, got ' '"),
    (AssemblerConfig, "ASSEMBLE_MAX_ATTEMPTS", "0", "ASSEMBLE_MAX_ATTEMPTS must be between 1 and 100, got 0"),
    (AssemblerConfig, "ASSEMBLE_MAX_ATTEMPTS", "101", "ASSEMBLE_MAX_ATTEMPTS must be between 1 and 100, got 101"),
    (SweeperConfig, "ABANDON_AFTER", "59", "ABANDON_AFTER must be at least 60, got 59"),
    (SweeperConfig, "ABANDON_AFTER", "1h", "ABANDON_AFTER must be an integer, got '1h'"),
    (ApiConfig, "INLINE_MAX_BYTES", "-1", "INLINE_MAX_BYTES must be between 0 and 6291456, got -1"),
    (ApiConfig, "INLINE_MAX_BYTES", str((6 << 20) + 1), "INLINE_MAX_BYTES must be between 0 and 6291456, got 6291457"),
    (ApiConfig, "PRESIGN_TTL", "0", "PRESIGN_TTL must be at least 1, got 0"),
    (ApiConfig, "PRESIGN_TTL", "five", "PRESIGN_TTL must be an integer, got 'five'"),
])
def test_malformed_integers(cls, name, raw, message):
    with pytest.raises(ConfigError) as info:
        cls.from_env({**BASE, name: raw})
    assert str(info.value) == message


@pytest.mark.parametrize(("raw", "ttl"), [("1", 1), ("60", 60), ("899", 899), ("900", 900), ("901", 900),
                                          ("3600", 900), ("604800", 900), (" 120 ", 120)])
def test_presign_ttl_is_capped_at_900(raw, ttl):
    assert ApiConfig.from_env({**BASE, "PRESIGN_TTL": raw}).presign_ttl == ttl


@pytest.mark.parametrize("prefix", ["staging", "/staging/", "a/../", "../"])
def test_malformed_staging_prefix_fails_at_startup(prefix):
    with pytest.raises(ConfigError) as info:
        AssemblerConfig.from_env({**BASE, "AUDIT_STAGING_PREFIX": prefix})
    assert str(info.value) == (
        f"AUDIT_STAGING_PREFIX must be non-empty, relative and end with '/', got {prefix!r}")


def test_config_error_is_a_package_error():
    assert issubclass(ConfigError, config.OneoffAuditError)
