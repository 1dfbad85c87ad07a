"""Provenance cards (issue 13): every default of every registered protocol and preset names its
source, the known deviations carry reasons, ``dcbench protocols NAME [--json] [--set]`` shows
them, a user's --set is a deviation only where it can move the numbers, and docs/protocols.md
is the rendering of the current cards."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dcbench.cli import main
from dcbench.protocol import CommonSettings, FrozenFeatureSettings, affects_numbers, get_protocol, list_protocols
from dcbench.provenance import GENERATED_MARKER, card_dict, preset_choices, protocols_markdown, setting_names
from dcbench.settings import apply_settings, describe_fields

REPO = Path(__file__).resolve().parents[1]
BUILTIN = ["imagenet-linear", "knn", "linear", "oxford5k", "paris6k", "places-linear", "roxford5k", "rparis6k",
           "voc-det", "voc-seg", "voc07-cls", "voc07-lowshot", "voc07-svm"]
#: what a source must name: a repository path / file, a paper, or an explicit dcbench choice with its reason
SOURCE_MARKERS = ("/", ".py", ".yaml", "paper", "Table", "dcbench choice:")


def _cases():
    for name in list_protocols():
        for preset in preset_choices(get_protocol(name)):
            yield pytest.param(name, preset, id=f"{name}-{preset}")


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_the_builtin_protocols_are_all_covered():
    assert set(BUILTIN) <= set(list_protocols())


@pytest.mark.parametrize("name, preset", list(_cases()))
def test_every_setting_has_a_source(name, preset):
    protocol = get_protocol(name)
    card = card_dict(protocol, {} if preset is None else {"preset": preset})
    names = [f.name for f in dataclasses.fields(protocol.Settings)]
    sources = {s["setting"]: s["source"] for s in card["sources"]}
    assert sorted(card["settings"]) == sorted(names) and list(card["settings"]) == setting_names(protocol)
    missing = [n for n in names if not sources.get(n, "").strip()]
    assert not missing, f"{name} ({preset}): no source for {missing}"
    assert set(sources) <= set(names), f"{name}: sources of unknown settings {sorted(set(sources) - set(names))}"
    vague = [n for n, text in sources.items() if not any(m in text for m in SOURCE_MARKERS)]
    assert not vague, f"{name} ({preset}): sources name no repository, file, paper or dcbench choice: {vague}"
    for d in card["deviations"]:
        assert d["what"].strip() and d["why"].strip() and d["source"] == "card", d
    assert card["name"] == name and card["version"] == protocol.version


@pytest.mark.parametrize("name", BUILTIN)
def test_settings_that_cannot_move_numbers_are_never_deviations(name):
    protocol = get_protocol(name)
    defaults = protocol.default_settings()
    for field, value in (("seed", 7), ("workers", 0), ("cache", False), ("jobs", 3)):
        if not hasattr(defaults, field):
            continue
        assert not affects_numbers(protocol.Settings, field), (name, field)
        changed = apply_settings(defaults, {field: value})
        assert [d for d in protocol.deviations(changed) if d.source == "user"] == [], (name, field)


def test_a_changed_setting_is_a_user_deviation():
    protocol = get_protocol("linear")
    card = card_dict(protocol, {"crops": "center"})
    user = [d for d in card["deviations"] if d["source"] == "user"]
    assert user == [{"what": "crops=center", "why": "set by the user; the deepcluster default is tencrop",
                     "source": "user"}]
    assert card["settings"]["crops"] == "center"
    # the preset's own value is no deviation, whichever way it is given
    assert [d for d in card_dict(protocol, {"preset": "vissl", "crops": "center"})["deviations"]
            if d["source"] == "user"] == []
    det = card_dict(get_protocol("voc-det"), {"preset": "moco", "box_loss_beta": 0.0})
    assert [d for d in det["deviations"] if d["source"] == "user"] == []


@pytest.mark.parametrize("args, key, value", [
    (["voc07-svm"], "resize", "squash"),
    (["voc07-lowshot"], "resize", "squash"),
    (["linear", "--set", "preset=vissl"], "crops", "center"),
    (["linear"], "crops", "tencrop"),
    (["imagenet-linear", "--set", "preset=vissl"], "train_center_crop", False),
    (["roxford5k"], "query_crop", "before_resize"),
    (["rparis6k"], "query_crop", "before_resize"),
    (["oxford5k"], "query_crop", "after_resize"),
    (["knn"], "interpolation", "bicubic"),
    (["voc-det", "--set", "preset=moco"], "box_loss_beta", 0.0),
    (["voc-det", "--set", "preset=deepcluster"], "box_loss_beta", 1.0),
])
def test_protocols_json_shows_the_preset_defaults_and_their_sources(args, key, value):
    result = _invoke("protocols", args[0], "--json", *args[1:])
    assert result.exit_code == 0, result.output
    card = json.loads(result.output)
    assert set(card) >= {"name", "version", "settings", "sources", "deviations"}
    assert card["settings"][key] == value
    assert any(s["setting"] == key and s["source"] for s in card["sources"])


@pytest.mark.parametrize("name", BUILTIN)
def test_own_settings_come_before_the_common_ones(name):
    """`dcbench protocols NAME` lists the protocol's own settings first, then seed, batch_size, workers, ..."""
    protocol = get_protocol(name)
    common = {f.name for base in (CommonSettings, FrozenFeatureSettings) if issubclass(protocol.Settings, base)
              for f in dataclasses.fields(base)}
    names = list(card_dict(protocol)["settings"])
    flags = [n in common for n in names]
    assert flags == sorted(flags), names  # every own setting before every common one
    own = [f.name for f in dataclasses.fields(protocol.Settings) if f.name not in common]
    assert names[:len(own)] == own  # each group keeps its declaration order
    text = _invoke("protocols", name).output
    settings_block = text[text.index("settings (--set"):]
    positions = [settings_block.index(f"\n  {n} ") for n in names]
    assert positions == sorted(positions)


def test_describe_fields_can_put_base_fields_last():
    assert [row[0] for row in describe_fields(FrozenFeatureSettings)][:3] == ["seed", "batch_size", "workers"]
    rows = describe_fields(FrozenFeatureSettings, last=(CommonSettings,))
    assert [row[0] for row in rows] == ["taps", "image_size", "cache", "bn_recalibrate", "seed", "batch_size",
                                        "workers"]


def test_protocols_text_shows_sources_and_deviations():
    result = _invoke("protocols", "voc-det", "--set", "preset=deepcluster", "--set", "iterations=100")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "source: rbgirshick/fast-rcnn" in out and "selective search" in out
    assert "[set by you] iterations=100" in out
    assert _invoke("protocols", "--json").exit_code != 0  # --json describes one protocol


def test_versions_of_the_changed_protocols():
    """Issue 13 moved numbers of these protocols (see CHANGELOG)."""
    versions = {n: get_protocol(n).version for n in BUILTIN}
    # 4: ViT default tap cls, input conventions of published weights (this release)
    # 5: augmented crops seeded per (seed, epoch, image): independent of workers and world size
    assert versions["linear"] == versions["imagenet-linear"] == versions["places-linear"] == "5"
    # 3 / 2: published weights read with their own input convention (this release)
    assert versions["voc07-svm"] == versions["voc07-lowshot"] == "3"
    assert versions["voc-det"] == "4"  # 4: flips seeded per (seed, epoch, image), any workers
    # 3: ViT cls head (voc07-cls) and Swin maps read channels-last (both; issue 19)
    assert versions["voc07-cls"] == "3"
    assert versions["voc-seg"] == "4"  # 4: order and transforms seeded per (seed, pass, image), any workers
    assert versions["knn"] == "4"  # 4: zero-vote classes never hit, vote ties by class index
    assert {versions[n] for n in ("roxford5k", "rparis6k", "oxford5k", "paris6k")} == {"3"}


def test_docs_protocols_md_is_the_rendering_of_the_current_cards():
    """docs/protocols.md = a written preamble, then `dcbench protocols --markdown` (generated)."""
    text = (REPO / "docs" / "protocols.md").read_text()
    assert GENERATED_MARKER in text, "docs/protocols.md lost its generated part"
    generated = text[text.index(GENERATED_MARKER):]
    assert generated == protocols_markdown([get_protocol(n) for n in BUILTIN]), \
        "docs/protocols.md is stale: replace everything from the marker line with `dcbench protocols --markdown`"
    assert generated == _invoke("protocols", "--markdown").output
