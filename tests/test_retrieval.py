"""Instance retrieval: revisitop metrics by hand and against an independent implementation,
the R-MAC pieces, the dataset readers in both layouts, the fixture generator, and the four
protocols end to end (CLI, errors, feature cache, learnable fixture)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dcbench.checkpoint import resolve_checkpoint
from dcbench.cli import main
from dcbench.data import DataError
from dcbench.data.retrieval import image_set_paths, read_original, read_retrieval_dataset, read_revisitop
from dcbench.data.synthetic_retrieval import make_retrieval_dataset, make_retrieval_root
from dcbench.errors import UsageError
from dcbench.metrics.retrieval import (old_protocol_gnd, old_protocol_map, revisited_gnd, revisited_map,
                                       revisited_setups)
from dcbench.settings import apply_settings
from dcbench.protocol import EvalContext, get_protocol
from dcbench.protocols.retrieval import retrieval_taps
from dcbench.retrieval import (Regions, learn_whitening, plan_geometry, pool_regions, rank_database, rmac_descriptors,
                               rmac_regions)

FAST = ["--set", "image_size=96", "--set", "workers=0"]
ALL_NAMES = ("roxford5k", "rparis6k", "oxford5k", "paris6k")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_retrieval_root(tmp_path_factory.mktemp("retrieval") / "data", names=ALL_NAMES, image_size=96)


def _invoke(*args):
    return CliRunner().invoke(main, list(map(str, args)))


# ----------------------------------------------------------------------------- metrics by hand
# Database of 6 images, three queries (columns).
# q0: ranking 3 0 5 1 4 2, ok {0, 1}, junk {5}. Positives at 1 and 3; junk 5 (at 2) precedes
#     the second, so without junk they sit at ranks 1 and 2.
#     AP = [(0/1 + 1/2)/2 + (1/2 + 2/3)/2] / 2 = (0.25 + 0.583333) / 2 = 0.416667.
#     1-based ranks 2, 3 -> P@1 = 0/1, P@5 = P@10 = 2/min(3, k) = 2/3.
# q1: ranking 2 0 1 3 4 5, ok {2, 3}, no junk. Positives at ranks 0 and 3.
#     AP = [(1 + 1/1)/2 + (1/3 + 2/4)/2] / 2 = (1 + 0.416667) / 2 = 0.708333.
#     1-based ranks 1, 4 -> P@1 = 1, P@5 = P@10 = 2/min(4, k) = 0.5.
# q2: no positive -> NaN, left out of the means.
HAND_RANKS = np.array([[3, 0, 5, 1, 4, 2], [2, 0, 1, 3, 4, 5], [0, 1, 2, 3, 4, 5]]).T
HAND_GND = [{"ok": [0, 1], "junk": [5]}, {"ok": [2, 3], "junk": []}, {"ok": [], "junk": [1]}]


def test_revisited_map_hand_example():
    result = revisited_map(HAND_RANKS, HAND_GND, kappas=(1, 5, 10))
    np.testing.assert_allclose(result.aps[:2], [0.416667, 0.708333], atol=1e-6)
    assert np.isnan(result.aps[2]) and np.isnan(result.prs[2]).all()
    np.testing.assert_allclose(result.prs[:2], [[0, 2 / 3, 2 / 3], [1, 0.5, 0.5]], atol=1e-9)
    assert result.map == pytest.approx(0.5625, abs=1e-6)
    np.testing.assert_allclose(result.mpr, [0.5, 0.583333, 0.583333], atol=1e-6)
    mAP, aps, mpr, prs = result  # unpacks like revisitop's compute_map
    assert mAP == result.map and prs.shape == (3, 3)


def test_revisited_map_truncated_ranking_and_empty_cases():
    # top-2 only: positive 0 at rank 1, positive 5 never ranked -> AP = (0 + 1/2)/2 / 2 = 0.125
    result = revisited_map(np.array([[1], [0]]), [{"ok": [0, 5]}], kappas=(1, 2))
    assert result.map == pytest.approx(0.125)
    np.testing.assert_allclose(result.prs[0], [0.0, 0.5])
    nothing = revisited_map(np.array([[1], [0]]), [{"ok": [7]}])
    assert nothing.map == 0.0 and (nothing.prs == 0).all()
    assert np.isnan(revisited_map(np.array([[0]]), [{"ok": []}]).map)
    with pytest.raises(ValueError, match="transpose"):
        revisited_map(HAND_RANKS.T, HAND_GND)


# gnd easy {0}, hard {1}, junk {2}; ranking 3 1 2 0:
# easy   (ok {0},   junk {2,1}): 0 is at 3, two junk before -> rank 1 -> AP (0 + 1/2)/2 = 0.25
# medium (ok {0,1}, junk {2}):   ranks 1 and 2 -> AP [(0 + 1/2)/2 + (1/2 + 2/3)/2]/2 = 0.416667
# hard   (ok {1},   junk {2,0}): 1 is at 1, nothing before -> AP 0.25
def test_easy_medium_hard_construction():
    gnd = [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 5, 5]}]
    built = {s: revisited_gnd(gnd, s)[0] for s in ("easy", "medium", "hard")}
    assert sorted(built["easy"]["ok"]) == [0] and sorted(built["easy"]["junk"]) == [1, 2]
    assert sorted(built["medium"]["ok"]) == [0, 1] and sorted(built["medium"]["junk"]) == [2]
    assert sorted(built["hard"]["ok"]) == [1] and sorted(built["hard"]["junk"]) == [0, 2]
    ranks = np.array([[3, 1, 2, 0]]).T
    maps = {s: r.map for s, r in revisited_setups(ranks, gnd).items()}
    assert maps == pytest.approx({"easy": 0.25, "medium": 0.416667, "hard": 0.25}, abs=1e-6)
    with pytest.raises(ValueError, match="unknown revisited setup"):
        revisited_gnd(gnd, "extreme")


def test_old_protocol_good_and_ok_positive_junk_ignored():
    gnd = [{"good": [0], "ok": [1], "junk": [2]}]
    assert sorted(old_protocol_gnd(gnd)[0]["ok"]) == [0, 1]
    assert old_protocol_map(np.array([[3, 1, 2, 0]]).T, gnd).map == pytest.approx(0.416667, abs=1e-6)


def _reference_ap(ranking, ok, junk):
    """Oxford's compute_ap.cpp formulation: walk the list, skip junk, add trapezoids."""
    ok, junk = set(ok), set(junk)
    ap, old_recall, old_precision, hits, seen = 0.0, 0.0, 1.0, 0, 0
    for item in ranking:
        if item in junk:
            continue
        hits += item in ok
        seen += 1
        recall, precision = hits / len(ok), hits / seen
        ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision = recall, precision
    return ap


def _reference_precision(ranking, ok, junk, k):
    kept = [item for item in ranking if item not in set(junk)]
    found = [i + 1 for i, item in enumerate(kept) if item in set(ok)]
    if not found:
        return 0.0
    kq = min(k, found[-1])
    return sum(1 for r in found if r <= kq) / kq


def test_revisited_map_equals_independent_implementation_on_random_cases():
    rng = np.random.default_rng(0)
    kappas = (1, 5, 10)
    for _ in range(60):
        n_db, n_q = int(rng.integers(1, 60)), int(rng.integers(1, 8))
        sim = rng.normal(size=(n_db, n_q))
        ranks = np.argsort(-sim, axis=0)
        if rng.random() < 0.3:
            ranks = ranks[: int(rng.integers(1, n_db + 1))]  # truncated rankings
        gnd = []
        for _q in range(n_q):
            labels = rng.choice(3, size=n_db, p=[0.6, 0.25, 0.15])  # 0 other, 1 positive, 2 junk
            gnd.append({"ok": np.flatnonzero(labels == 1), "junk": np.flatnonzero(labels == 2)})
        result = revisited_map(ranks, gnd, kappas)
        ref_aps = [_reference_ap(ranks[:, q], g["ok"], g["junk"]) if len(g["ok"]) else np.nan
                   for q, g in enumerate(gnd)]
        np.testing.assert_allclose(result.aps, ref_aps, atol=1e-9)
        for q, g in enumerate(gnd):
            if len(g["ok"]):
                ref = [_reference_precision(ranks[:, q], g["ok"], g["junk"], k) for k in kappas]
                np.testing.assert_allclose(result.prs[q], ref, atol=1e-12)
        if not np.isnan(ref_aps).all():
            assert result.map == pytest.approx(np.nanmean(ref_aps), abs=1e-9)


# ----------------------------------------------------------------------------- R-MAC pieces
def test_rmac_grid_by_hand():
    # 5 x 7 map: level-1 overlap closest to 40% with 2 regions along the width (m = 1).
    # l=1 side 5: x 0,2; l=2 side 3: x 0,2,4 / y 0,2; l=3 side 2: x 0,1,3,5 / y 0,1,3.
    regions = rmac_regions(5, 7, 3)
    assert regions[:2] == [(0, 0, 5), (2, 0, 5)]
    assert regions[2:8] == [(x, y, 3) for y in (0, 2) for x in (0, 2, 4)]
    assert regions[8:] == [(x, y, 2) for y in (0, 1, 3) for x in (0, 1, 3, 5)]
    assert len(rmac_regions(7, 7)) == 1 + 4 + 9  # square: l x l regions per level
    assert rmac_regions(1, 1) == [(0, 0, 1)]  # tiny maps keep the one region that fits
    for h, w in [(3, 17), (31, 24), (64, 48)]:
        assert all(0 <= x and x + s <= w and 0 <= y and y + s <= h for x, y, s in rmac_regions(h, w))


def test_pool_regions_max_then_l2():
    fmap = torch.rand(2, 3, 5, 7)
    pooled = pool_regions(fmap, 3)
    assert pooled.shape == (2, 20, 3)
    manual = fmap[:, :, 0:5, 2:7].amax(dim=(-2, -1))
    torch.testing.assert_close(pooled[:, 1], manual / manual.norm(dim=1, keepdim=True))
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(2, 20))


def test_geometry_resize_then_crop_box_scaled_alike():
    assert plan_geometry(1024, 768, 1024).size == (1024, 768)
    geo = plan_geometry(2048, 1536, 1024, box=(100.0, 200.0, 1100.0, 1000.0))
    assert geo.resize == (1024, 768) and geo.crop == (50, 100, 550, 500) and geo.size == (500, 400)
    tiny = plan_geometry(1024, 768, 1024, box=(0, 0, 10, 20))
    assert min(tiny.size) == 32 and tiny.size == (32, 64)  # upscaled so every backbone has a map


def test_geometry_crop_before_resize_cuts_the_original_image():
    """revisitop: the box is cut from the original pixels (PIL's rounding), then scaled by the
    whole image's ratio, so the query keeps the database's scale."""
    geo = plan_geometry(2048, 1536, 1024, box=(100.4, 200.6, 1100.5, 1001.0), crop_first=True)
    assert geo.crop_first and geo.crop == (100, 201, 1100, 1001) and geo.size == (500, 400)
    from PIL import Image

    from dcbench.retrieval import prepare_image
    img = Image.new("RGB", (400, 300))
    img.paste((255, 0, 0), (100, 100, 300, 200))  # a red box on black
    before = prepare_image(img, 200, (100.0, 100.0, 300.0, 200.0), crop_first=True)
    after = prepare_image(img, 200, (100.0, 100.0, 300.0, 200.0))
    assert before.size == after.size == (100, 50)
    # cut first, no black pixel of the surroundings bleeds into the border by resampling
    assert min(before.getpixel((0, 0))[0], before.getpixel((99, 49))[0]) == 255


def test_whitening_decorrelates_and_descriptors_are_unit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 6)) @ rng.normal(size=(6, 6)) + 3.0
    white = learn_whitening([x[:1000], x[1000:]], dim=4)
    z = (x - white.mean_) @ white.projection_.astype(np.float64)
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(4), atol=1e-3)
    regions = Regions(x.astype(np.float32), np.repeat(np.arange(400), 10), 401)  # image 400 unreadable
    desc = rmac_descriptors(regions, white)
    assert desc.shape == (401, 4) and np.allclose(np.linalg.norm(desc[:400], axis=1), 1, atol=1e-5)
    assert not desc[400].any()


def test_rank_database_is_inner_product_order():
    rng = np.random.default_rng(1)
    db, q = rng.normal(size=(30, 8)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
    np.testing.assert_array_equal(rank_database(db, q), np.argsort(-(db @ q.T), axis=0, kind="stable"))


def test_default_taps_per_arch():
    assert retrieval_taps(resolve_checkpoint("random:alexnet,size=64").backbone, None) == ["conv5"]
    vgg = resolve_checkpoint("random:vgg16,size=64").backbone
    assert retrieval_taps(vgg, None) == ["conv5_3"]
    with pytest.raises(UsageError, match="not a conv tap"):
        retrieval_taps(vgg, ["fc7"])


# ----------------------------------------------------------------------------- readers + fixture
def test_readers_both_layouts(root):
    rox = read_revisitop(root, "roxford5k")
    assert rox.layout == "revisitop" and len(rox.imlist) == 4 * 6 + 10 and len(rox.qimlist) == 8
    assert not set(rox.qimlist) & set(rox.imlist)
    g = rox.gnd[0]
    assert (len(g["easy"]), len(g["hard"]), len(g["junk"])) == (3, 2, 1) and len(g["bbx"]) == 4
    ox = read_original(root, "oxford5k")
    assert ox.layout == "original" and len(ox.imlist) == 4 * 6 + 10 + 8  # queries are database images
    assert ox.qimlist[0] in [ox.imlist[i] for i in ox.gnd[0]["good"]]
    query_file = (root / "oxford5k" / "gt" / f"{ox.gnd[0]['query']}_query.txt").read_text()
    assert query_file.startswith("oxc1_") and "oxc1_" not in ox.qimlist[0]
    pa = read_retrieval_dataset(root, "paris6k")
    assert all(n.startswith("paris_") for n in pa.imlist)
    assert not set(pa.imlist) & set(ox.imlist)  # other landmarks, so one can whiten the other
    assert image_set_paths(root, "rparis6k") == read_revisitop(root, "rparis6k").db_paths()


def test_fixture_is_deterministic(tmp_path):
    a = make_retrieval_dataset(tmp_path / "a", "roxford5k", image_size=64, n_landmarks=2, distractors=2)
    b = make_retrieval_dataset(tmp_path / "b", "roxford5k", image_size=64, n_landmarks=2, distractors=2)
    assert read_revisitop(a.parent, "roxford5k").fingerprint() == read_revisitop(b.parent, "roxford5k").fingerprint()


def test_original_layout_accepts_deepclusters_lab_folder(root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(root / "paris6k", data / "paris6k")
    (data / "paris6k" / "gt").rename(data / "paris6k" / "lab")
    lab = read_original(data, "paris6k")
    ref = read_original(root, "paris6k")
    assert lab.qimlist == ref.qimlist and lab.imlist == ref.imlist
    assert all(np.array_equal(a["good"], b["good"]) for a, b in zip(lab.gnd, ref.gnd))


def _copy(root, tmp_path, names=ALL_NAMES):
    out = tmp_path / "data"
    for name in names:
        shutil.copytree(root / name, out / name)
    return out


def test_reader_errors_are_one_clear_line(root, tmp_path):
    data = _copy(root, tmp_path, ("roxford5k", "oxford5k"))
    (data / "roxford5k" / "gnd_roxford5k.pkl").unlink()
    with pytest.raises(DataError, match="gnd_roxford5k.pkl is missing"):
        read_revisitop(data, "roxford5k")
    (data / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot be read"):
        read_revisitop(data, "roxford5k")
    ox = read_original(data, "oxford5k")
    victim = ox.files[ox.imlist[ox.gnd[1]["ok"][0]]]
    (data / "oxford5k" / "jpg" / victim.rsplit("/", 1)[1]).unlink()
    with pytest.raises(DataError, match=r"listed in gt/.*_ok\.txt is missing") as err:
        read_original(data, "oxford5k")
    assert "\n" not in str(err.value)
    (data / "oxford5k" / "gt" / f"{ox.gnd[0]['query']}_junk.txt").unlink()
    with pytest.raises(DataError, match="_junk.txt is missing"):
        read_original(data, "oxford5k")


# ----------------------------------------------------------------------------- protocols end to end
def test_cli_roxford5k_prints_map_easy_medium_hard_and_mp(root, tmp_path):
    result = _invoke("eval", "--protocol", "roxford5k", "--checkpoint", "random:alexnet", "--data", root,
                     "--store", tmp_path / "r.db", "--json", *FAST)
    assert result.exit_code == 0, result.output
    for name in ("mAP_easy", "mAP_medium", "mAP_hard", "mP@1_medium", "mP@10_hard"):
        assert name in result.output  # the printed table
    record = json.loads(result.output.strip().splitlines()[-1])
    metrics = {m["metric"]: m for m in record["metrics"]}
    expected = {f"mAP_{s}" for s in ("easy", "medium", "hard")} | {
        f"mP@{k}_{s}" for k in (1, 5, 10) for s in ("easy", "medium", "hard")}
    assert set(metrics) == expected
    assert all(0 <= m["value"] <= 100 and m["tap"] == "conv5" for m in metrics.values())
    extra = record["extra"]
    assert extra["whitening"] == {"dataset": "rparis6k", "fallback_used": False, "images": 34}
    assert extra["images_per_s"]["database@1.0"] > 0 and extra["feature_cache"]["database@1.0"] == "extracted"
    assert record["settings"]["image_size"] == 96 and record["settings"]["query_crop"] == "before_resize"
    assert record["settings"]["whitening"] == "rparis6k" and record["data"]["fingerprint"]
    assert extra["bn_recalibrate"]["ran"] is True and extra["seed_dependent"] is True  # a random init's BN
    # per-query APs stored for the paired bootstrap over queries: their mean is each mAP row
    from dcbench.results import ResultStore
    with ResultStore(tmp_path / "r.db", readonly=True) as db:
        (stored,) = db.results()
        outcomes = db.outcomes(stored.id)
    assert sorted(outcomes) == [f"mAP_{s}/conv5" for s in ("easy", "hard", "medium")]
    for setup in ("easy", "medium", "hard"):
        aps = outcomes[f"mAP_{setup}/conv5"]
        assert 100 * aps.mean() == pytest.approx(metrics[f"mAP_{setup}"]["value"], abs=1e-9)


def test_cli_oxford5k_original_layout_prints_map(root, tmp_path):
    result = _invoke("eval", "--protocol", "oxford5k", "--checkpoint", "random:alexnet", "--data", root,
                     "--store", tmp_path / "r.db", "--json", *FAST)
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert [m["metric"] for m in record["metrics"]] == ["mAP"] and " mAP " in result.output
    assert record["extra"]["whitening"]["dataset"] == "paris6k" and record["extra"]["layout"] == "original"


@pytest.mark.parametrize("protocol,breakage,text", [
    ("roxford5k", "gnd", "gnd_roxford5k.pkl is missing"),
    ("roxford5k", "image", "listed in gnd_roxford5k.pkl is missing"),
    ("oxford5k", "image", "is missing"),
    ("roxford5k", "whitening", "whitening_fallback=true"),
])
def test_cli_missing_pieces_one_line_exit_1(root, tmp_path, protocol, breakage, text):
    data = _copy(root, tmp_path, ("roxford5k", "rparis6k", "oxford5k", "paris6k"))
    if breakage == "gnd":
        (data / "roxford5k" / "gnd_roxford5k.pkl").unlink()
    elif breakage == "image":
        ds = read_retrieval_dataset(data, protocol)
        listed = ds.gnd[0]["easy" if protocol == "roxford5k" else "good"][0]
        (data / protocol / "jpg" / f"{ds.imlist[listed]}.jpg").unlink()
    else:
        shutil.rmtree(data / "rparis6k")
    result = _invoke("eval", "--protocol", protocol, "--checkpoint", "random:alexnet", "--data", data,
                     "--store", tmp_path / "r.db", *FAST)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.output


def _run(name, root, cache, spec="random:alexnet,sobel=0", **overrides):
    proto = get_protocol(name)
    settings = apply_settings(proto.default_settings(), {"image_size": 96, "workers": 0, **overrides})
    proto.check_data(root, settings)
    ckpt = resolve_checkpoint(spec, input_size=settings.image_size)
    return proto.run(ckpt, settings, root, EvalContext(cache_dir=cache, settings=settings))


def test_feature_cache_reuse_and_sharing_with_the_other_protocol(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _run("roxford5k", root, cache, bn_recalibrate="off")
    assert set(first.extra["feature_cache"].values()) == {"extracted"}
    assert first.extra["seed_dependent"] is False  # retrieval is deterministic without BN re-estimation
    # the second run reads every region set from the cache: no forward pass at all
    import dcbench.features as features

    def no_forward(*args, **kwargs):
        raise AssertionError("forward pass despite a cached extraction")

    monkeypatch.setattr(features, "_forward_rows", no_forward)
    again = _run("roxford5k", root, cache, bn_recalibrate="off")
    assert set(again.extra["feature_cache"].values()) == {"hit"}
    assert again.extra["images_per_s"]["database@1.0"] is None
    assert [(m.metric, m.value) for m in again.metrics] == [(m.metric, m.value) for m in first.metrics]
    monkeypatch.undo()
    # rparis6k's database is roxford5k's whitening set (and vice versa): only its queries are new
    paris = _run("rparis6k", root, cache, bn_recalibrate="off")
    assert paris.extra["feature_cache"] == {"database@1.0": "hit", "queries@1.0": "extracted",
                                            "whitening@1.0": "hit"}


def test_whitening_fallback_and_none_are_recorded(root, tmp_path):
    data = _copy(root, tmp_path, ("roxford5k",))
    with pytest.raises(DataError, match="rparis6k"):
        _run("roxford5k", data, None)
    fallback = _run("roxford5k", data, None, whitening_fallback=True, bn_recalibrate="off")
    assert fallback.extra["whitening"]["fallback_used"] is True
    assert "database" in fallback.extra["whitening"]["dataset"]
    plain = _run("roxford5k", data, None, whitening="none", bn_recalibrate="off", scales=[1.0, 0.75])
    assert plain.extra["whitening"]["dataset"] is None and plain.extra["taps"]["conv5"]["whitening_dim"] is None
    assert set(plain.extra["feature_cache"]) == {"database@1.0", "queries@1.0", "database@0.75", "queries@0.75"}


def test_bad_settings_are_usage_errors():
    proto = get_protocol("roxford5k")
    for overrides in ({"scales": [0]}, {"image_size": 8}, {"whitening": "../etc"}, {"levels": 0}):
        with pytest.raises(UsageError):
            apply_settings(proto.default_settings(), overrides)
    defaults = proto.default_settings()
    assert (defaults.image_size, defaults.levels, defaults.scales, defaults.query_crop) == \
        (1024, 3, [1.0], "before_resize")
    assert {p: get_protocol(p).default_settings().query_crop for p in ALL_NAMES} == {
        "roxford5k": "before_resize", "rparis6k": "before_resize", "oxford5k": "after_resize",
        "paris6k": "after_resize"}
    assert defaults.whitening == "rparis6k" and defaults.whitening_fallback is False
    assert {p: get_protocol(p).default_settings().whitening for p in ALL_NAMES} == {
        "roxford5k": "rparis6k", "rparis6k": "roxford5k", "oxford5k": "paris6k", "paris6k": "oxford5k"}


def test_learnable_fixture_far_above_chance(tmp_path):
    """R-MAC on a random AlexNet retrieves the right landmark far above a random ranking."""
    data = make_retrieval_root(tmp_path / "data", image_size=160)
    out = _run("roxford5k", data, None, image_size=160)
    got = {m.metric: m.value for m in out.metrics}
    ds = read_revisitop(data, "roxford5k")
    rng = np.random.default_rng(0)
    chance = np.mean([revisited_setups(np.stack([rng.permutation(len(ds.imlist)) for _ in ds.qimlist], 1),
                                       ds.gnd)["medium"].map for _ in range(50)]) * 100
    assert chance < 25
    assert got["mAP_medium"] > max(2.5 * chance, 50), (got, chance)
    assert got["mAP_easy"] > got["mAP_hard"] and got["mP@1_medium"] >= 50


# ----------------------------------------------------------------------------- issue 13
def test_paris6k_leaves_out_its_corrupted_images(tmp_path):
    """The 20 known-corrupted Paris images (DeepCluster's eval_retrieval.py blacklist) are not
    database images and do not count as positives, even when a ground-truth list names them."""
    from dcbench.data.retrieval import PARIS6K_CORRUPTED
    assert len(PARIS6K_CORRUPTED) == len(set(PARIS6K_CORRUPTED)) == 20
    root = tmp_path / "data"
    make_retrieval_dataset(root, "paris6k", image_size=64, corrupted=3)
    ds = read_original(root, "paris6k")
    assert ds.excluded == sorted(PARIS6K_CORRUPTED[:3])
    assert not set(PARIS6K_CORRUPTED) & set(ds.imlist)
    clean = make_retrieval_dataset(tmp_path / "clean", "paris6k", image_size=64)
    reference = read_original(clean.parent, "paris6k")
    assert ds.imlist == reference.imlist  # same database as without the corrupted files
    assert all((a["ok"] == b["ok"]).all() for a, b in zip(ds.gnd, reference.gnd))
    assert not any(PARIS6K_CORRUPTED[0] in path for path in image_set_paths(root, "paris6k"))
    # another dataset name keeps such files (only paris6k has the list)
    make_retrieval_dataset(root, "oxford5k", image_size=64)
    assert read_original(root, "oxford5k").excluded == []
