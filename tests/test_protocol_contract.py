"""The protocol contract (dcbench/protocol.py), checked on every registered protocol, the way
timm tests every registered model: a new protocol module gets these tests for free."""
from __future__ import annotations

import dataclasses
import typing

import pytest
from click.testing import CliRunner

from dcbench.cli import main
from dcbench.protocol import CommonSettings, Protocol, get_protocol, list_protocols
from dcbench.settings import apply_settings, describe_fields

PROTOCOLS = list_protocols()


def test_every_builtin_protocol_is_registered():
    expected = {"linear", "imagenet-linear", "places-linear", "knn", "voc07-cls", "voc07-svm", "voc07-lowshot",
                "voc-det", "voc-seg", "oxford5k", "paris6k", "roxford5k", "rparis6k"}
    assert expected <= set(PROTOCOLS)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_metadata_and_settings_are_documented(name):
    proto = get_protocol(name)
    assert isinstance(proto, Protocol) and proto.name == name
    assert proto.description and "\n" not in proto.description
    assert proto.version and proto.data_layout.strip()
    assert isinstance(proto.finetune, bool)
    defaults = proto.default_settings()
    assert isinstance(defaults, CommonSettings), "derive Settings from dcbench.protocol.CommonSettings"
    undocumented = [f for f, _t, _d, text in describe_fields(type(defaults)) if not text.strip()]
    assert not undocumented, f"settings without help: {undocumented}"
    assert apply_settings(defaults, {}, owner=name) == defaults  # the defaults are valid


@pytest.mark.parametrize("name", PROTOCOLS)
def test_describe_renders(name):
    out = CliRunner().invoke(main, ["protocols", name])
    assert out.exit_code == 0, out.output
    assert f"{name} (version {get_protocol(name).version})" in out.output
    for field in dataclasses.fields(get_protocol(name).Settings):
        assert field.name in out.output


def _bad_value(hint: typing.Any) -> str | None:
    """A value of the wrong type for a settings field, or None when any text would do."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint in (int, float) or (origin in (typing.Union, getattr(__import__("types"), "UnionType")) and args
                                and all(a in (int, float) for a in args)):
        return "not-a-number"
    if hint is bool:
        return "maybe"
    if origin is typing.Literal:
        return "no-such-choice"
    return None


@pytest.mark.parametrize("name", PROTOCOLS)
def test_bad_settings_are_rejected_before_any_work(name, tmp_path):
    """Exit 2 (usage) from the settings alone: the data root does not even exist and the
    checkpoint spec is expensive, so any data check or loading would fail differently."""
    runner = CliRunner()
    base = ["eval", "--protocol", name, "--checkpoint", "random:vgg16", "--data", str(tmp_path / "missing")]
    unknown = runner.invoke(main, [*base, "--set", "no_such_setting=1"])
    assert unknown.exit_code == 2 and "unknown setting 'no_such_setting'" in unknown.output
    hints = typing.get_type_hints(get_protocol(name).Settings)
    tried = 0
    for field, hint in hints.items():
        if field.startswith("_") or (bad := _bad_value(hint)) is None:
            continue
        out = runner.invoke(main, [*base, "--set", f"{field}={bad}"])
        assert out.exit_code == 2, (field, out.output)
        assert field in out.output
        tried += 1
    assert tried > 0
    missing = runner.invoke(main, base)
    assert missing.exit_code == 1 and "error:" in missing.output  # then the data check, one line
    assert "Traceback" not in missing.output
