"""The JSON Schemas are the authority: well-formed, consistent with each other, with ids.py and check_event."""

from __future__ import annotations

import base64
import json
from importlib import resources

import pytest
from format_samples import chunk_header, sample
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from oneoff_audit.errors import FormatError, InvalidIdError
from oneoff_audit.formats import SCHEMA_NAMES, check_event, load_schema, validate
from oneoff_audit.ids import validate_app, validate_session_id

pytestmark = pytest.mark.unit

DRAFT = "https://json-schema.org/draft/2020-12/schema"
FORMAT_SCHEMAS = ["session-header", "chunk-header", "event", "close-marker", "log-header", "log-trailer",
                  "index-entry"]


def _shipped() -> list[str]:
    folder = resources.files("oneoff_audit").joinpath("schemas")
    return sorted(p.name.removesuffix(".schema.json") for p in folder.iterdir() if p.name.endswith(".schema.json"))


def test_every_shipped_schema_is_known_and_every_known_schema_is_shipped():
    assert sorted(SCHEMA_NAMES) == _shipped()
    assert set(FORMAT_SCHEMAS) <= set(SCHEMA_NAMES)
    with pytest.raises(KeyError):
        load_schema("../session-header")


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_is_valid_draft_2020_12(name):
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == DRAFT
    assert schema["$id"].endswith(f"/{name}.schema.json")
    assert schema["title"]


def _patterns(node, path="#"):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield path, value
            else:
                yield from _patterns(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _patterns(value, f"{path}/{index}")


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_patterns_are_anchored_once(name):
    # formats gives patterns their ECMA-262 meaning by turning the final '$' into '\Z'; that relies on
    # every pattern being anchored at both ends and using '$' nowhere else.
    for path, pattern in _patterns(load_schema(name)):
        assert pattern.startswith("^") and pattern.endswith("$"), path
        assert "$" not in pattern[:-1], path


def test_python_regex_pitfalls_are_closed():
    """What a plain Python validator would wrongly accept, the shipped validation rejects."""
    plain = Draft202012Validator(load_schema("chunk-header"))
    for field, value in [("app", "app\n"), ("session_id", "S1\n"), ("prev_chunk_sha256", "a" * 64 + "\n")]:
        obj = {**chunk_header(seq=1), field: value}
        assert plain.is_valid(obj)  # Python's '$' matches before a final newline
        with pytest.raises(FormatError):
            validate(obj, "chunk-header", "chunk header")
    resize = [0, "r", "\u0668\u0660x24"]  # Arabic-Indic "80": \d in Python, not in ECMA-262
    assert Draft202012Validator(load_schema("event")).is_valid(resize)
    with pytest.raises(FormatError) as info:
        validate(resize, "event", "event")
    assert str(info.value) == "event: [2]: '\u0668\u0660x24' does not match '^\\\\d{1,5}x\\\\d{1,5}$'"


def _all_properties(name: str) -> dict:
    return load_schema(name)["properties"]


@pytest.mark.parametrize("field", ["app", "session_id"])
def test_id_rules_are_identical_in_every_schema(field):
    rules = {name: json.dumps(_all_properties(name)[field], sort_keys=True)
             for name in FORMAT_SCHEMAS if name != "event"}
    assert len(set(rules.values())) == 1, rules


def test_shared_parts_do_not_drift():
    session, log_header, index = (_all_properties(n) for n in ("session-header", "log-header", "index-entry"))
    assert set(log_header) == {*session, "type"}
    for key in session:
        if key != "format":
            assert log_header[key] == session[key], key
    for key in ("actor", "command", "target", "started_at", "session_id", "app"):
        assert index[key] == session[key], key
    assert load_schema("log-header")["required"] == ["type", *load_schema("session-header")["required"]]
    close, trailer = _all_properties("close-marker"), _all_properties("log-trailer")
    assert close["exit"] == trailer["exit"] == index["exit"]
    assert close["bytes"] == trailer["bytes"]
    b64 = session["command"]["properties"]["argv"]["items"]["oneOf"][1]
    event_b64 = load_schema("event")["allOf"][0]["then"]["prefixItems"][2]["oneOf"][1]
    assert b64 == event_b64


# ---------------------------------------------------------------- agreement with ids.py

def _accepts(fn, *args) -> bool:
    try:
        fn(*args)
    except (InvalidIdError, FormatError):
        return False
    return True


_IDS = st.one_of(
    st.text(alphabet="ab09AZ._-/%\n \uff41\u0663", max_size=10),
    st.text(max_size=8),
    st.text(alphabet="ab.-", min_size=98, max_size=130),
    st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,20}[a-z0-9]\Z"),
)


@settings(max_examples=150, deadline=None)
@given(_IDS)
def test_schemas_and_ids_module_agree_on_ids(value):
    assert _accepts(validate_app, value) == _accepts(validate, chunk_header() | {"app": value}, "chunk-header", "h")
    assert _accepts(validate_session_id, value) == _accepts(
        validate, chunk_header() | {"session_id": value}, "chunk-header", "h")


# ---------------------------------------------------------------- agreement with check_event

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_B64_TEXT = st.one_of(
    st.binary(max_size=8).map(_b64),
    st.binary(min_size=1, max_size=8).map(lambda b: _b64(b).rstrip("=")),  # padding dropped
    st.binary(min_size=1, max_size=8).map(lambda b: _b64(b) + "="),
    st.text(alphabet="AQ=+/-_ \n!", max_size=8),
)
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False,
                          allow_infinity=False), st.text(max_size=6))
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                     max_leaves=6)
_T = st.one_of(st.floats(min_value=0, max_value=1e9, allow_nan=False), st.integers(0, 10**9), _JSON_SCALARS)
_STREAM = st.one_of(st.sampled_from(["i", "o", "e", "r", "m"]), st.sampled_from(["x", "", "O", "io"]), _JSON_SCALARS)
_RESIZE = st.one_of(
    st.builds("{}x{}".format, st.integers(0, 10**6), st.integers(0, 10**6)),
    st.from_regex(r"\A[0-9]{0,6}[xX]?[0-9]{0,6}\n?\Z"),
    st.text(alphabet="0123456789x\u0663\uff11", max_size=8),
)
_MARKER = st.one_of(
    st.fixed_dictionaries({"kind": st.text(max_size=70)}, optional={"bytes": _JSON, "x": _JSON}),
    st.fixed_dictionaries({"kind": _JSON_SCALARS}),
    st.dictionaries(st.text(max_size=4), _JSON, max_size=2),
)
_DATA = st.one_of(
    st.text(max_size=10),
    st.fixed_dictionaries({"b64": _B64_TEXT}),
    st.fixed_dictionaries({"b64": _B64_TEXT}, optional={"x": _JSON}),
    st.fixed_dictionaries({"b64": _JSON_SCALARS}),
    _RESIZE,
    _MARKER,
    _JSON,
)
_VALID_T = st.one_of(st.floats(min_value=0, max_value=1e9, allow_nan=False), st.integers(0, 10**9))
_BYTES_DATA = st.one_of(st.text(max_size=10), st.fixed_dictionaries({"b64": _B64_TEXT}))
_EVENTS = st.one_of(  # mostly near-valid events, so that both answers are frequent
    st.tuples(_VALID_T, st.sampled_from(["i", "o", "e"]), _BYTES_DATA).map(list),
    st.tuples(_VALID_T, st.just("r"), _RESIZE).map(list),
    st.tuples(_VALID_T, st.just("m"), _MARKER).map(list),
    st.tuples(_VALID_T, st.sampled_from(["i", "o", "e", "r", "m"]), _DATA).map(list),
    st.tuples(_T, _STREAM, _DATA).map(list),
    st.lists(_JSON, max_size=4),
    _JSON,
)


@settings(max_examples=250, deadline=None)
@given(_EVENTS)
def test_check_event_agrees_with_event_schema(event):
    """check_event is the fast path the assembler uses per line; event.schema.json is the authority."""
    assert _accepts(check_event, event, "e") == _accepts(validate, event, "event", "e")


def test_agreement_covers_both_outcomes():
    # Guard against a generator that only ever produces one answer.
    accepted = [[0, "o", "x"], [1.5, "i", {"b64": "/w=="}], [2, "r", "80x24"], [3, "m", {"kind": "gap", "seq": 1}]]
    rejected = [[0, "o", {"b64": "QQ"}], [0, "r", "80x24\n"], [0, "m", {"kind": ""}], [-1, "o", "x"], [0, "q", "x"]]
    for event in accepted:
        assert _accepts(check_event, event, "e") and _accepts(validate, event, "event", "e")
    for event in rejected:
        assert not _accepts(check_event, event, "e") and not _accepts(validate, event, "event", "e")


@pytest.mark.parametrize("name", ["session-header", "chunk-header", "close-marker", "log-header", "log-trailer",
                                  "index-entry"])
def test_samples_validate(name):
    assert validate(sample(name), name, name) == sample(name)
