"""The SAM template's security and wiring properties, and the sample events in events/.

The template is loaded with a YAML loader that knows CloudFormation's short tags and evaluated with the
parameter defaults by a small resolver (Ref, Fn::GetAtt, Fn::Sub, Fn::If, ...), so assertions compare exact
ARNs and values: e.g. the queue policy names the very bucket ARN the bucket will have.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest
import yaml
from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEvent, EventBridgeEvent, S3Event, SQSEvent

from oneoff_audit import config as config_module
from oneoff_audit.crypto import PURPOSE
from oneoff_audit.errors import InvalidIdError
from oneoff_audit.ids import validate_app, validate_session_id
from oneoff_audit.keys import parse_staging_key

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = ROOT / "template.yaml"
EVENTS = ROOT / "events"

ACCOUNT = "123456789012"
REGION = "us-east-1"
STACK_ID = f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/oneoff-audit/5f2a9c0e-1234-11ef-9a3b-0a1b2c3d4e5f"
PSEUDO = {
    "AWS::AccountId": ACCOUNT, "AWS::Region": REGION, "AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "oneoff-audit", "AWS::StackId": STACK_ID,
}
EXPECTED_BUCKET = f"oneoff-audit-{ACCOUNT}-0a1b2c3d4e5f"
BUCKET_ARN = f"arn:aws:s3:::{EXPECTED_BUCKET}"

DIGEST_ENV = getattr(getattr(config_module, "DigestConfig", None), "ENV", ("AUDIT_BUCKET", "AUDIT_SIGNING_KEY_ID"))
FUNCTIONS = {  # logical id -> (code folder name, ENV tuple its code reads)
    "AssemblerFunction": ("assembler", config_module.AssemblerConfig.ENV),
    "SweeperFunction": ("sweeper", config_module.SweeperConfig.ENV),
    "DigestFunction": ("digest", DIGEST_ENV),
    "ApiFunction": ("api", config_module.ApiConfig.ENV),
}
API_ROUTES = {
    ("GET", "/apps/{app}/sessions"),
    ("GET", "/apps/{app}/sessions/{session}"),
    ("GET", "/apps/{app}/sessions/{session}/log"),
    ("GET", "/apps/{app}/sessions/{session}/access"),
    ("GET", "/apps/{app}/integrity"),
    ("PUT", "/apps/{app}/sessions/{session}/legal-hold"),
    ("DELETE", "/apps/{app}/sessions/{session}/legal-hold"),
}
KMS_CRYPTO = (
    "kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext", "kms:GenerateDataKeyPair", "kms:GenerateDataKeyPairWithoutPlaintext",
    "kms:Sign", "kms:Verify", "kms:GenerateMac", "kms:VerifyMac", "kms:DeriveSharedSecret", "kms:CreateGrant",
)
# SAM policy templates the template may use, with the actions they expand to.
SAM_POLICY_TEMPLATES = {"SQSSendMessagePolicy": ("sqs:SendMessage*",)}


# --------------------------------------------------------------------------------------------------
# Loading and evaluating the template
# --------------------------------------------------------------------------------------------------
class _CfnLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML loader that turns CloudFormation's short tags (!Ref, !Sub, ...) into their long form."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else "Condition" if suffix == "Condition" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


_CfnLoader.add_multi_constructor("!", _tag)
TEMPLATE: dict[str, Any] = yaml.load(TEMPLATE_PATH.read_text("utf-8"), Loader=_CfnLoader)
RESOURCES: dict[str, Any] = TEMPLATE["Resources"]
PARAMS: dict[str, Any] = TEMPLATE["Parameters"]


class Resolver:
    """Evaluate intrinsic functions with parameter defaults (or overrides) and placeholder attributes."""

    def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        self.params = {name: spec.get("Default") for name, spec in PARAMS.items()}
        self.params.update(overrides or {})

    def condition(self, name: str) -> bool:
        return bool(self.value(TEMPLATE["Conditions"][name]))

    def ref(self, name: str) -> Any:
        if name in PSEUDO:
            return PSEUDO[name]
        if name in self.params:
            spec = PARAMS[name]
            value = self.params[name]
            if spec["Type"] == "CommaDelimitedList":
                return [] if value in ("", None) else [v.strip() for v in str(value).split(",")]
            return value
        assert name in RESOURCES, f"Ref to unknown {name}"
        if name == "AuditBucket":
            return self.value(RESOURCES["AuditBucket"]["Properties"]["BucketName"])
        return f"<{name}>"

    def getatt(self, name: str, attr: str) -> str:
        sam_role = name.endswith("Role") and RESOURCES.get(name[:-4], {}).get("Type") == "AWS::Serverless::Function"
        assert name in RESOURCES or sam_role, f"GetAtt of unknown {name}"
        if name == "AuditBucket" and attr == "Arn":
            return f"arn:aws:s3:::{self.ref('AuditBucket')}"
        if name.endswith("Role") and attr == "Arn":
            return f"arn:aws:iam::{ACCOUNT}:role/{name}"
        return f"<{name}.{attr}>"

    def sub(self, text: str, local: dict[str, Any]) -> str:
        def one(match: re.Match[str]) -> str:
            token = match.group(1)
            if token in local:
                return str(local[token])
            if "." in token:
                return self.getatt(*token.split(".", 1))
            return str(self.ref(token))

        return re.sub(r"\$\{([^}!]+)\}", one, text)

    def value(self, node: Any) -> Any:
        if isinstance(node, list):
            return [v for v in (self.value(n) for n in node) if v is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (fn, arg), = node.items()
            if fn == "Ref":
                return _NO_VALUE if arg == "AWS::NoValue" else self.ref(arg)
            if fn == "Fn::GetAtt":
                name, attr = arg if isinstance(arg, list) else arg.split(".", 1)
                return self.getatt(name, attr)
            if fn == "Fn::Sub":
                if isinstance(arg, str):
                    return self.sub(arg, {})
                text, local = arg
                return self.sub(text, {k: self.value(v) for k, v in local.items()})
            if fn == "Fn::Select":
                return self.value(arg[1])[int(self.value(arg[0]))]
            if fn == "Fn::Split":
                return str(self.value(arg[1])).split(arg[0])
            if fn == "Fn::Join":
                return arg[0].join(str(v) for v in self.value(arg[1]))
            if fn == "Fn::If":
                return self.value(arg[1] if self.condition(arg[0]) else arg[2])
            if fn == "Fn::Equals":
                return self.value(arg[0]) == self.value(arg[1])
            if fn == "Fn::Not":
                return not self.value(arg[0])
            if fn == "Fn::FindInMap":
                return TEMPLATE["Mappings"][arg[0]][self.value(arg[1])][self.value(arg[2])]
            if fn == "Condition":
                return self.condition(arg)
        return {k: v for k, v in ((k, self.value(v)) for k, v in node.items()) if v is not _NO_VALUE}


_NO_VALUE = object()
R = Resolver()


def resource(name: str, resolver: Resolver = R) -> dict[str, Any]:
    """The resolved properties of a resource."""
    return resolver.value(RESOURCES[name].get("Properties", {}))


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def role_arn(function: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/{function}Role"


def function_statements(function: str) -> Iterator[dict[str, Any]]:
    """Every IAM statement the function's Policies grant (inline statements and known SAM templates)."""
    props = resource(function)
    assert "Role" not in props, f"{function} must use its own SAM-generated role"
    for policy in props.get("Policies", []):
        assert isinstance(policy, dict), f"{function}: managed policy {policy!r} by name is not least privilege"
        if "Statement" in policy:
            yield from policy["Statement"]
            continue
        (name, _), = policy.items()
        assert name in SAM_POLICY_TEMPLATES, f"{function}: unexpected SAM policy template {name}"
        yield {"Effect": "Allow", "Action": list(SAM_POLICY_TEMPLATES[name]), "Resource": f"<{name}>"}


def key_statements(key: str, resolver: Resolver) -> list[dict[str, Any]]:
    return resource(key, resolver)["KeyPolicy"]["Statement"]


def grants(statements: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    """Allow statements whose actions match ``action`` (patterns in the policy included)."""
    return [s for s in statements if s["Effect"] == "Allow"
            and any(fnmatch.fnmatchcase(action, a) for a in as_list(s["Action"]))]


def principals(statement: dict[str, Any]) -> set[str]:
    return {p for p in as_list(statement["Principal"]["AWS"])}


def test_template_uses_no_yaml_aliases() -> None:
    """CloudFormation rejects YAML anchors and aliases; the SAM CLI would accept them."""
    events = yaml.parse(TEMPLATE_PATH.read_text("utf-8"), Loader=_CfnLoader)
    assert not [e for e in events if isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None)]


# --------------------------------------------------------------------------------------------------
# Functions
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_function_code_handler_and_layer(function: str) -> None:
    folder, _ = FUNCTIONS[function]
    props = resource(function)
    assert props["CodeUri"] == f"functions/{folder}/"
    assert props["Handler"] == f"{folder}_handler.lambda_handler"
    handler = ROOT / "functions" / folder / f"{folder}_handler.py"
    assert handler.is_file(), f"{handler} is missing"
    tree = ast.parse(handler.read_text("utf-8"))
    assert "lambda_handler" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    globals_fn = TEMPLATE["Globals"]["Function"]
    assert globals_fn["Layers"] == [{"Ref": "OneoffAuditLayer"}]
    assert "Layers" not in props
    assert globals_fn["Runtime"] == "python3.12"


def test_layer_is_built_by_sam_from_the_package() -> None:
    layer = RESOURCES["OneoffAuditLayer"]
    assert layer["Type"] == "AWS::Serverless::LayerVersion"
    assert layer["Metadata"]["BuildMethod"] == TEMPLATE["Globals"]["Function"]["Runtime"]
    assert layer["Metadata"]["BuildArchitecture"] == "arm64" == TEMPLATE["Globals"]["Function"]["Architectures"][0]
    props = resource("OneoffAuditLayer")
    assert props["ContentUri"] == "layers/oneoff_audit/"
    assert props["CompatibleArchitectures"] == ["arm64"]
    assert (ROOT / "layers/oneoff_audit/requirements.txt").is_file()
    assert (ROOT / "layers/oneoff_audit/oneoff_audit/__init__.py").is_file()


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_environment_is_exactly_what_the_code_reads(function: str) -> None:
    _, env_names = FUNCTIONS[function]
    variables = resource(function)["Environment"]["Variables"]
    assert sorted(variables) == sorted(env_names)
    # The defaults the template passes are accepted by the component's own parser.
    config_class = {"AssemblerFunction": config_module.AssemblerConfig, "SweeperFunction": config_module.SweeperConfig,
                    "ApiFunction": config_module.ApiConfig}.get(function, getattr(config_module, "DigestConfig", None))
    if config_class is not None:
        config_class.from_env({k: str(v) for k, v in variables.items()})


def test_globals_carry_only_powertools_settings() -> None:
    variables = TEMPLATE["Globals"]["Function"]["Environment"]["Variables"]
    assert all(name.startswith("POWERTOOLS_") for name in variables)
    assert variables["POWERTOOLS_SERVICE_NAME"] == "oneoff-audit"
    assert variables["POWERTOOLS_METRICS_NAMESPACE"] == "OneoffAudit"
    assert variables["POWERTOOLS_LOG_LEVEL"] == {"Ref": "LogLevel"}
    # Responses can be decrypted audit logs: never copy them into traces or log the event.
    assert variables["POWERTOOLS_TRACER_CAPTURE_RESPONSE"] == "false"
    assert variables["POWERTOOLS_LOGGER_LOG_EVENT"] == "false"


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_function_policies_have_no_wildcard_action_and_stay_on_their_prefixes(function: str) -> None:
    statements = list(function_statements(function))
    assert statements
    for st in statements:
        assert st["Effect"] == "Allow"
        for action in as_list(st["Action"]):
            assert action != "*" and not action.endswith(":*"), f"{function}: wildcard action {action}"
            service = action.split(":", 1)[0]
            assert service != "kms", f"{function}: KMS use is granted by the key policies, not IAM"
            if service == "s3":
                assert "*" not in action, f"{function}: {action} is a pattern"
        for res in as_list(st["Resource"]):
            assert res != "*", f"{function}: statement {st.get('Sid')} on every resource"
            if any(a.startswith("s3:") for a in as_list(st["Action"])):
                assert res == BUCKET_ARN or res.startswith(BUCKET_ARN + "/"), res
                assert res != BUCKET_ARN + "/*", f"{function}: whole bucket instead of a prefix"


def _s3_grants(function: str) -> dict[str, set[str]]:
    """action -> resources the function may use it on."""
    out: dict[str, set[str]] = {}
    for st in function_statements(function):
        for action in as_list(st["Action"]):
            out.setdefault(action, set()).update(as_list(st["Resource"]))
    return out


def test_function_permissions_are_the_documented_ones() -> None:
    b = BUCKET_ARN
    assert _s3_grants("AssemblerFunction") == {
        "s3:ListBucket": {b},
        "s3:GetObject": {f"{b}/staging/*", f"{b}/logs/*", f"{b}/index/*", f"{b}/manifests/*"},
        "s3:DeleteObject": {f"{b}/staging/*"},
        "s3:PutObject": {f"{b}/logs/*", f"{b}/index/*", f"{b}/manifests/*"},
        "s3:AbortMultipartUpload": {f"{b}/logs/*", f"{b}/index/*", f"{b}/manifests/*"},
        "s3:PutObjectRetention": {f"{b}/logs/*", f"{b}/index/*", f"{b}/manifests/*"},
        "s3:GetObjectVersion": {f"{b}/logs/*"},
    }
    assert _s3_grants("SweeperFunction") == {"s3:ListBucket": {b}, "sqs:SendMessage*": {"<SQSSendMessagePolicy>"}}
    sqs_template = {"SQSSendMessagePolicy": {"QueueName": "<AssemblyQueue.QueueName>"}}
    assert resource("SweeperFunction")["Policies"][0] == sqs_template
    assert _s3_grants("DigestFunction") == {
        "s3:ListBucket": {b}, "s3:ListBucketVersions": {b},
        "s3:GetObject": {f"{b}/manifests/*", f"{b}/digests/*"}, "s3:PutObject": {f"{b}/digests/*"},
        "s3:PutObjectRetention": {f"{b}/digests/*"},
    }
    api = _s3_grants("ApiFunction")
    assert api["s3:PutObject"] == {f"{b}/access/*"}
    assert api["s3:PutObjectLegalHold"] == {f"{b}/logs/*", f"{b}/manifests/*"}
    assert api["s3:GetObject"] == {f"{b}/staging/*/opened.json", f"{b}/staging/*/closed.json", f"{b}/logs/*",
                                   f"{b}/index/*", f"{b}/manifests/*", f"{b}/digests/*", f"{b}/access/*"}
    assert "s3:DeleteObject" not in api
    assert {"s3:DeleteObject", "s3:DeleteObjectVersion"} & set(_s3_grants("DigestFunction")) == set()


def test_assembler_consumes_the_queue_with_partial_batch_failures() -> None:
    props = resource("AssemblerFunction")
    (event,) = props["Events"].values()
    assert event["Type"] == "SQS"
    assert event["Properties"]["Queue"] == "<AssemblyQueue.Arn>"
    assert event["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert 1 <= event["Properties"]["BatchSize"] <= 5
    reserved = int(props["ReservedConcurrentExecutions"])
    assert 2 <= int(event["Properties"]["ScalingConfig"]["MaximumConcurrency"]) <= reserved
    queue = resource("AssemblyQueue")
    assert queue["VisibilityTimeout"] >= 6 * props["Timeout"]
    assert props["Timeout"] <= 900


def test_schedules() -> None:
    (sweep,) = resource("SweeperFunction")["Events"].values()
    (digest,) = resource("DigestFunction")["Events"].values()
    assert (sweep["Type"], sweep["Properties"]["Schedule"]) == ("Schedule", "rate(15 minutes)")
    assert (digest["Type"], digest["Properties"]["Schedule"]) == ("Schedule", "rate(1 hour)")
    # One digest writer at a time: concurrent runs could fork the chain.
    assert resource("DigestFunction")["ReservedConcurrentExecutions"] == 1


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_each_function_logs_to_its_own_group_with_retention(function: str) -> None:
    group = RESOURCES[function]["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
    assert RESOURCES[group]["Type"] == "AWS::Logs::LogGroup"
    assert resource(group)["RetentionInDays"] == 90


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("auditors", ["", "arn:aws:iam::123456789012:role/Auditor"])
def test_log_key_only_assembler_generates_and_only_api_and_auditors_decrypt(auditors: str) -> None:
    resolver = Resolver({"AuditorPrincipalArns": auditors})
    key = resource("LogKey", resolver)
    assert key["EnableKeyRotation"] is True
    assert (key["KeySpec"], key["KeyUsage"]) == ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    assert RESOURCES["LogKey"]["DeletionPolicy"] == "Retain"
    statements = key_statements("LogKey", resolver)
    purpose = {"StringEquals": {"kms:EncryptionContext:purpose": PURPOSE}}

    (generate,) = grants(statements, "kms:GenerateDataKey")
    assert principals(generate) == {role_arn("AssemblerFunction")}
    assert as_list(generate["Action"]) == ["kms:GenerateDataKey"]
    assert generate["Condition"] == purpose

    decrypters = grants(statements, "kms:Decrypt")
    assert all(s["Condition"] == purpose and as_list(s["Action"]) == ["kms:Decrypt"] for s in decrypters)
    expected = {role_arn("ApiFunction")} | ({auditors} if auditors else set())
    assert set().union(*(principals(s) for s in decrypters)) == expected

    for action in KMS_CRYPTO:
        if action not in ("kms:GenerateDataKey", "kms:Decrypt"):
            assert grants(statements, action) == [], f"{action} is granted on the log key"
    _check_admin_statement(statements)


def _check_admin_statement(statements: list[dict[str, Any]]) -> None:
    admin = [s for s in statements if principals(s) == {f"arn:aws:iam::{ACCOUNT}:root"}
             and s["Sid"] == "KeyAdministrationWithoutUse"]
    assert len(admin) == 1
    assert "kms:PutKeyPolicy" in admin[0]["Action"]
    for action in admin[0]["Action"]:
        assert "*" not in action
        assert action not in KMS_CRYPTO, f"the account root may {action}"


def test_signing_key_is_p256_and_only_filers_sign() -> None:
    key = resource("SigningKey")
    assert (key["KeySpec"], key["KeyUsage"]) == ("ECC_NIST_P256", "SIGN_VERIFY")
    assert RESOURCES["SigningKey"]["DeletionPolicy"] == "Retain"
    statements = key_statements("SigningKey", R)
    (sign,) = grants(statements, "kms:Sign")
    assert principals(sign) == {role_arn("AssemblerFunction"), role_arn("DigestFunction")}
    assert as_list(sign["Action"]) == ["kms:Sign"]
    assert sign["Condition"] == {"StringEquals": {"kms:SigningAlgorithm": "ECDSA_SHA_256"}}
    public = set().union(*(principals(s) for s in grants(statements, "kms:GetPublicKey")))
    assert {role_arn("AssemblerFunction"), role_arn("DigestFunction"), role_arn("ApiFunction")} <= public
    for action in KMS_CRYPTO:
        if action not in ("kms:Sign", "kms:Verify"):
            assert grants(statements, action) == [], f"{action} is granted on the signing key"
    _check_admin_statement(statements)


def test_storage_key_is_usable_only_through_s3_for_the_audit_bucket() -> None:
    key = resource("StorageKey")
    assert key["EnableKeyRotation"] is True
    statements = key_statements("StorageKey", R)
    (use,) = [s for s in statements if s["Sid"] != "KeyAdministrationWithoutUse"]
    assert sorted(use["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert use["Condition"] == {
        "StringEquals": {"kms:CallerAccount": ACCOUNT, "kms:ViaService": f"s3.{REGION}.amazonaws.com"},
        "StringLike": {"kms:EncryptionContext:aws:s3:arn": [BUCKET_ARN, BUCKET_ARN + "/*"]},
    }
    _check_admin_statement(statements)


# --------------------------------------------------------------------------------------------------
# Bucket
# --------------------------------------------------------------------------------------------------
def test_bucket_name_is_derived_from_the_stack_id() -> None:
    assert R.ref("AuditBucket") == EXPECTED_BUCKET


def test_bucket_blocks_public_access_and_encrypts_with_the_storage_key() -> None:
    bucket = resource("AuditBucket")
    assert bucket["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True,
    }
    assert bucket["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    (rule,) = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule == {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": "<StorageKey.Arn>"},
                    "BucketKeyEnabled": True}
    assert RESOURCES["AuditBucket"]["DeletionPolicy"] == "Retain"


@pytest.mark.parametrize(("preset", "mode", "days"), [
    ("1-year", "GOVERNANCE", 366), ("hipaa-6-years", "COMPLIANCE", 6 * 365 + 2),
    ("soc2-7-years", "COMPLIANCE", 7 * 365 + 2), ("custom", "GOVERNANCE", 30),
])
def test_object_lock_retention_on_filed_objects_and_versioning(preset: str, mode: str, days: int) -> None:
    """Object Lock is on; retention is put on each filed object by the functions that file them,
    not as a bucket default (which would also lock every staging chunk for years)."""
    resolver = Resolver({"RetentionPreset": preset, "ObjectLockMode": mode, "RetentionDays": 30})
    bucket = resource("AuditBucket", resolver)
    assert bucket["ObjectLockEnabled"] is True
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    assert bucket["ObjectLockConfiguration"] == {"ObjectLockEnabled": "Enabled"}
    for function in ("AssemblerFunction", "DigestFunction"):
        variables = resource(function, resolver)["Environment"]["Variables"]
        assert (variables["LOG_LOCK_MODE"], variables["LOG_RETENTION_DAYS"]) == (mode, days)
        retention = config_module.Retention.from_env({k: str(v) for k, v in variables.items()})
        assert retention == config_module.Retention(mode, days)
    assert set(PARAMS["RetentionPreset"]["AllowedValues"]) == set(TEMPLATE["Mappings"]["RetentionPresets"])
    assert PARAMS["ObjectLockMode"]["AllowedValues"] == ["GOVERNANCE", "COMPLIANCE"]


def test_bucket_policy_denies_plain_http_and_guards_filed_evidence() -> None:
    props = resource("AuditBucketPolicy")
    assert props["Bucket"] == EXPECTED_BUCKET
    statements = {s["Sid"]: s for s in props["PolicyDocument"]["Statement"]}
    tls = statements["DenyInsecureTransport"]
    assert (tls["Effect"], tls["Principal"], tls["Action"]) == ("Deny", "*", "s3:*")
    assert tls["Resource"] == [BUCKET_ARN, BUCKET_ARN + "/*"]
    assert tls["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}

    def only(sid: str, action: str, prefixes: list[str], function: str) -> None:
        st = statements[sid]
        assert (st["Effect"], st["Principal"]) == ("Deny", "*")
        assert as_list(st["Action"]) == [action]
        assert as_list(st["Resource"]) == [f"{BUCKET_ARN}/{p}*" for p in prefixes]
        assert st["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": role_arn(function)}}

    only("OnlyTheAssemblerFilesLogs", "s3:PutObject", ["logs/", "index/", "manifests/"], "AssemblerFunction")
    only("OnlyTheDigestFunctionWritesDigests", "s3:PutObject", ["digests/"], "DigestFunction")
    only("OnlyTheApiRecordsAccess", "s3:PutObject", ["access/"], "ApiFunction")
    only("OnlyTheApiSetsLegalHolds", "s3:PutObjectLegalHold", [""], "ApiFunction")
    deletes = statements["NoDeletesOfFiledEvidence"]
    assert (deletes["Effect"], deletes["Principal"], "Condition" in deletes) == ("Deny", "*", False)
    assert deletes["Action"] == ["s3:DeleteObject", "s3:DeleteObjectVersion"]
    assert deletes["Resource"] == [f"{BUCKET_ARN}/{p}/*" for p in ("logs", "index", "manifests", "digests", "access")]
    assert not [s for s in statements.values() if s["Effect"] == "Allow"]


def test_lifecycle_aborts_uploads_and_backstops_staging_beyond_the_sweeper_window() -> None:
    rules = {r["Id"]: r for r in resource("AuditBucket")["LifecycleConfiguration"]["Rules"]}
    assert rules["AbortIncompleteMultipartUploads"]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert "Prefix" not in rules["AbortIncompleteMultipartUploads"]
    backstop = rules["StagingBackstop"]
    assert backstop["Prefix"] == "staging/"
    abandon = PARAMS["AbandonAfterSeconds"]["Default"]
    # Even the smallest allowed expiry leaves the sweeper (every 15 min, after ABANDON_AFTER) a day or more.
    assert PARAMS["StagingExpiryDays"]["MinValue"] * 86400 >= abandon + 86400
    assert backstop["ExpirationInDays"] * 86400 >= 7 * 86400
    assert rules["StagingDeleteMarkers"] == {"Id": "StagingDeleteMarkers", "Status": "Enabled", "Prefix": "staging/",
                                             "ExpiredObjectDeleteMarker": True}
    for rule in rules.values():
        assert rule.get("Prefix") in (None, "staging/"), "only staging may expire: filed evidence is kept"


def test_closed_markers_notify_the_queue_and_only_this_bucket_may_send() -> None:
    (notification,) = resource("AuditBucket")["NotificationConfiguration"]["QueueConfigurations"]
    assert notification["Event"] == "s3:ObjectCreated:*"
    assert notification["Queue"] == "<AssemblyQueue.Arn>"
    assert notification["Filter"]["S3Key"]["Rules"] == [{"Name": "prefix", "Value": "staging/"},
                                                          {"Name": "suffix", "Value": "closed.json"}]
    # S3 checks the queue policy when it stores the notification.
    assert "AssemblyQueuePolicy" in RESOURCES["AuditBucket"]["DependsOn"]
    (allow,) = resource("AssemblyQueuePolicy")["PolicyDocument"]["Statement"]
    assert allow["Sid"] == "ClosedSessionsFromTheAuditBucket" and allow["Effect"] == "Allow"
    assert allow["Principal"] == {"Service": "s3.amazonaws.com"} and allow["Action"] == "sqs:SendMessage"
    assert allow["Resource"] == "<AssemblyQueue.Arn>"
    assert allow["Condition"] == {"ArnEquals": {"aws:SourceArn": BUCKET_ARN},
                                  "StringEquals": {"aws:SourceAccount": ACCOUNT}}


@pytest.mark.parametrize("enabled", ["true", "false"])
def test_server_access_logs_go_to_a_separate_bucket(enabled: str) -> None:
    resolver = Resolver({"EnableS3AccessLogs": enabled})
    logging = resource("AuditBucket", resolver).get("LoggingConfiguration")
    if enabled == "false":
        assert logging is None
        return
    assert logging == {"DestinationBucketName": "<AccessLogsBucket>", "LogFilePrefix": "audit-bucket/"}
    (writer,) = [s for s in resource("AccessLogsBucketPolicy")["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    assert writer["Principal"] == {"Service": "logging.s3.amazonaws.com"}
    assert writer["Condition"]["ArnLike"] == {"aws:SourceArn": BUCKET_ARN}
    assert resource("AccessLogsBucket")["PublicAccessBlockConfiguration"]["RestrictPublicBuckets"] is True
    assert "AccessLogsReady" in RESOURCES["AuditBucket"]["DependsOn"]
    assert R.value(RESOURCES["AccessLogsReady"]["Metadata"]) == {"LogBucketPolicy": "<AccessLogsBucketPolicy>"}


# --------------------------------------------------------------------------------------------------
# Runner access, queues, API, alarms, outputs
# --------------------------------------------------------------------------------------------------
def test_runner_policy_allows_only_put_object_under_staging() -> None:
    document = resource("RunnerPolicy")["PolicyDocument"]
    assert document["Statement"] == [{"Sid": "StageSessions", "Effect": "Allow", "Action": "s3:PutObject",
                                      "Resource": f"{BUCKET_ARN}/staging/*"}]
    assert TEMPLATE["Outputs"]["RunnerPolicyArn"]["Value"] == {"Ref": "RunnerPolicy"}


def test_auditor_policy_reads_filed_evidence_only() -> None:
    statements = {s["Sid"]: s for s in resource("AuditorPolicy")["PolicyDocument"]["Statement"]}
    assert set(statements) == {"ListEvidence", "ReadEvidence", "SigningPublicKey"}
    assert statements["ListEvidence"]["Resource"] == BUCKET_ARN
    read = statements["ReadEvidence"]
    assert read["Action"] == ["s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectRetention", "s3:GetObjectLegalHold"]
    assert read["Resource"] == [f"{BUCKET_ARN}/{p}/*" for p in ("logs", "index", "manifests", "digests")]
    assert statements["SigningPublicKey"] == {"Sid": "SigningPublicKey", "Effect": "Allow",
                                              "Action": "kms:GetPublicKey", "Resource": "<SigningKey.Arn>"}
    for st in statements.values():
        assert st["Effect"] == "Allow"
        assert all(not a.startswith("s3:Put") and not a.startswith("s3:Delete") for a in as_list(st["Action"]))
    assert TEMPLATE["Outputs"]["AuditorPolicyArn"]["Value"] == {"Ref": "AuditorPolicy"}


def test_assembly_queue_redrives_to_the_dead_letter_queue_after_the_last_attempt() -> None:
    queue = resource("AssemblyQueue")
    redrive = queue["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == "<AssemblyDeadLetterQueue.Arn>"
    assert redrive["maxReceiveCount"] > PARAMS["AssembleMaxAttempts"]["Default"]
    assert queue["SqsManagedSseEnabled"] is True
    dlq = resource("AssemblyDeadLetterQueue")
    assert dlq["MessageRetentionPeriod"] == 14 * 86400 and dlq["SqsManagedSseEnabled"] is True


def test_api_routes_authorizer_logging_and_throttling() -> None:
    routes = set()
    for event in resource("ApiFunction")["Events"].values():
        assert event["Type"] == "Api" and event["Properties"]["RestApiId"] == "<AuditApi>"
        routes.add((event["Properties"]["Method"].upper(), event["Properties"]["Path"]))
    assert routes == API_ROUTES
    api = resource("AuditApi")
    auth = api["Auth"]
    assert auth["DefaultAuthorizer"] == "CognitoAuthorizer"
    assert auth["Authorizers"]["CognitoAuthorizer"]["UserPoolArn"] == "<AuditUserPool.Arn>"
    given = Resolver({"UserPoolArn": "arn:aws:cognito-idp:us-east-1:123456789012:userpool/us-east-1_Ex4mpl3Po"})
    assert resource("AuditApi", given)["Auth"]["Authorizers"]["CognitoAuthorizer"]["UserPoolArn"].endswith("Ex4mpl3Po")
    assert not given.condition("CreateUserPool")
    assert api["AccessLogSetting"]["DestinationArn"] == "<ApiAccessLogGroup.Arn>"
    assert json.loads(api["AccessLogSetting"]["Format"])["sub"] == "$context.authorizer.claims.sub"
    (settings,) = api["MethodSettings"]
    assert settings["ThrottlingRateLimit"] == 20 and settings["ThrottlingBurstLimit"] == 40
    assert settings["DataTraceEnabled"] is False
    assert api["TracingEnabled"] is True


def test_created_user_pool_does_not_let_users_grant_themselves_apps() -> None:
    pool = resource("AuditUserPool")
    assert pool["AdminCreateUserConfig"] == {"AllowAdminCreateUserOnly": True}
    assert {a["Name"] for a in pool["Schema"]} == {"audit_apps", "audit_admin"}
    client = resource("AuditUserPoolClient")
    assert {"custom:audit_apps", "custom:audit_admin"} <= set(client["ReadAttributes"])
    assert not [a for a in client["WriteAttributes"] if a.startswith("custom:")]


def test_alarms_cover_dead_letters_incomplete_abandoned_and_errors() -> None:
    alarms = {name: resource(name) for name, r in RESOURCES.items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    by_metric = {(a["Namespace"], a["MetricName"], json.dumps(a["Dimensions"], sort_keys=True)): a
                 for a in alarms.values()}

    def find(namespace: str, metric: str, dimensions: list[dict[str, str]]) -> dict[str, Any]:
        return by_metric[(namespace, metric, json.dumps(dimensions, sort_keys=True))]

    dlq = find("AWS/SQS", "ApproximateNumberOfMessagesVisible",
               [{"Name": "QueueName", "Value": "<AssemblyDeadLetterQueue.QueueName>"}])
    assert (dlq["Threshold"], dlq["ComparisonOperator"]) == (1, "GreaterThanOrEqualToThreshold")
    service = [{"Name": "service", "Value": "oneoff-audit"}]
    find("OneoffAudit", "SessionsIncomplete", service)
    find("OneoffAudit", "SessionsAbandoned", service)
    for function in FUNCTIONS:
        find("AWS/Lambda", "Errors", [{"Name": "FunctionName", "Value": f"<{function}>"}])
    for alarm in alarms.values():
        assert alarm["AlarmActions"] == ["<AlarmTopic>"]


def test_outputs() -> None:
    outputs = TEMPLATE["Outputs"]
    for name in ("ApiUrl", "AuditBucketName", "LogKeyArn", "SigningKeyArn", "RunnerPolicyArn", "AuditorPolicyArn",
                 "AssemblyQueueUrl", "DeadLetterQueueUrl", "StagingPrefix"):
        assert outputs[name]["Description"], name
    assert R.value(outputs["ApiUrl"]["Value"]) == "https://<AuditApi>.execute-api.us-east-1.amazonaws.com/v1"
    assert R.value(outputs["AuditBucketName"]["Value"]) == EXPECTED_BUCKET


def test_samconfig_has_default_and_prod_with_valid_parameter_overrides() -> None:
    conf = tomllib.loads((ROOT / "samconfig.toml").read_text("utf-8"))
    for env in ("default", "prod"):
        deploy = conf[env]["deploy"]["parameters"]
        assert "CAPABILITY_IAM" in deploy["capabilities"]
        assert deploy["confirm_changeset"] is True
        overrides = dict(re.findall(r'(\w+)="([^"]*)"', deploy["parameter_overrides"]))
        assert overrides
        for name, value in overrides.items():
            spec = PARAMS[name]
            if "AllowedValues" in spec:
                assert value in [str(v) for v in spec["AllowedValues"]], (name, value)
            if "AllowedPattern" in spec:
                assert re.fullmatch(spec["AllowedPattern"], value), (name, value)
            if spec["Type"] == "Number":
                assert spec.get("MinValue", -1) <= int(value) <= spec.get("MaxValue", 1 << 62), (name, value)
    assert conf["default"]["global"]["parameters"]["stack_name"] != conf["prod"]["global"]["parameters"]["stack_name"]


# --------------------------------------------------------------------------------------------------
# Sample events (what `sam local invoke -e` feeds the handlers)
# --------------------------------------------------------------------------------------------------
def load_event(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / name).read_text("utf-8"))


def test_every_function_has_sample_events() -> None:
    names = {p.name for p in EVENTS.glob("*.json")}
    for folder, _ in FUNCTIONS.values():
        assert any(n.startswith(folder + "_") for n in names), folder


def _sqs_records(name: str) -> list[Any]:
    event = SQSEvent(load_event(name))
    records = list(event.records)
    assert records
    for record in records:
        assert record.event_source == "aws:sqs"
        assert record.event_source_arn.startswith(f"arn:aws:sqs:{REGION}:{ACCOUNT}:")
        assert record.md5_of_body == hashlib.md5(record.body.encode()).hexdigest()
        assert int(record.attributes.approximate_receive_count) >= 1
    return records


def test_sqs_closed_event_carries_the_url_encoded_staging_key() -> None:
    (record,) = _sqs_records("assembler_sqs_closed.json")
    (s3_record,) = S3Event(json.loads(record.body)).records
    assert s3_record.event_name == "ObjectCreated:Put"
    assert re.fullmatch(r"oneoff-audit-\d{12}-[0-9a-f]{12}", s3_record.s3.bucket.name)
    parsed = parse_staging_key(s3_record.s3.get_object.key, url_encoded=True)
    assert (parsed.app, parsed.session_id, parsed.kind) == ("billing.api_v2", "01M89JNXGSK9V8X5T4R2N1B0AQ", "closed")


def test_sqs_event_with_an_encoded_bad_key_decodes_to_an_invalid_app() -> None:
    (record,) = _sqs_records("assembler_sqs_closed_bad_key.json")
    key = json.loads(record.body)["Records"][0]["s3"]["object"]["key"]
    assert unquote_plus(key) == "staging/billing api/01M89JNXGSK9V8X5T4R2N1B0AQ/closed.json"
    with pytest.raises(InvalidIdError):
        parse_staging_key(key, url_encoded=True)


def test_sqs_s3_test_event_and_sweep_message() -> None:
    (test_record,) = _sqs_records("assembler_sqs_s3_test_event.json")
    assert json.loads(test_record.body)["Event"] == "s3:TestEvent"
    (sweep,) = _sqs_records("assembler_sqs_sweep.json")
    body = json.loads(sweep.body)
    assert sorted(body) == ["app", "oneoff_audit", "session_id"] and body["oneoff_audit"] == "sweep"
    validate_app(body["app"])
    validate_session_id(body["session_id"])


@pytest.mark.parametrize("name", ["sweeper_scheduled.json", "digest_scheduled.json"])
def test_scheduled_events(name: str) -> None:
    event = EventBridgeEvent(load_event(name))
    assert (event.detail_type, event.source, event.detail) == ("Scheduled Event", "aws.events", {})
    (rule,) = event.resources
    assert rule.startswith(f"arn:aws:events:{REGION}:{ACCOUNT}:rule/")


API_EVENT_FILES = sorted(p.name for p in EVENTS.glob("api_*.json"))


def _route_resolver() -> APIGatewayRestResolver:
    """A resolver with the template's routes that echoes which route matched and its parameters."""
    app = APIGatewayRestResolver()
    for method, path in sorted(API_ROUTES):
        powertools_path = re.sub(r"\{(\w+)\}", r"<\1>", path)

        def echo(_method: str = method, _path: str = path, **params: str) -> dict[str, Any]:
            return {"route": [_method, _path], "params": params}

        app.route(powertools_path, method=method)(echo)
    return app


def test_every_api_route_has_a_sample_event() -> None:
    covered = {(load_event(n)["httpMethod"], load_event(n)["resource"]) for n in API_EVENT_FILES}
    assert covered == API_ROUTES


@pytest.mark.parametrize("name", API_EVENT_FILES)
def test_api_event_has_the_rest_proxy_shape_powertools_routes(name: str, lambda_context: Any) -> None:
    raw = load_event(name)
    event = APIGatewayProxyEvent(raw)
    assert (event.http_method, event.resource) in API_ROUTES
    path = event.resource
    for param, value in event.path_parameters.items():
        path = path.replace("{" + param + "}", value)
    assert event.path == path and "{" not in path
    context = raw["requestContext"]
    stage = PARAMS["ApiStageName"]["Default"]
    assert (context["resourcePath"], context["httpMethod"], context["stage"]) == (raw["resource"], raw["httpMethod"],
                                                                                 stage)
    assert context["path"] == f"/{stage}{path}"
    assert {k: [v] for k, v in raw["headers"].items()} == raw["multiValueHeaders"]
    query = raw["queryStringParameters"]
    assert raw["multiValueQueryStringParameters"] == (None if query is None else {k: [v] for k, v in query.items()})
    claims = event.request_context.authorizer.claims
    assert claims["sub"] and claims["token_use"] == "id"
    assert isinstance(claims["custom:audit_apps"], str) and claims["custom:audit_admin"] in ("true", "false")
    validate_app(event.path_parameters["app"])
    if "session" in event.path_parameters:
        validate_session_id(event.path_parameters["session"])

    response = _route_resolver().resolve(raw, lambda_context)
    assert response["statusCode"] == 200
    assert json.loads(response["body"]) == {"route": [raw["httpMethod"], raw["resource"]],
                                            "params": event.path_parameters}
