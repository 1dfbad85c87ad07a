"""The third-party protocol example (examples/protocol-plugin) installs and runs as a user's would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcbench.data.synthetic import make_image_folder
from dcbench.results import ResultStore

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "examples" / "protocol-plugin"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """``pip install`` the example into a private folder (no network: no build isolation, no deps)."""
    target = tmp_path_factory.mktemp("plugin-site")
    build = tmp_path_factory.mktemp("plugin-build")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(PLUGIN)],
                   check=True, capture_output=True, text=True, cwd=build,
                   env={**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return target


def _dcbench(args: list[str], plugin: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(plugin), "OMP_NUM_THREADS": "1",
           "DCBENCH_CACHE": str(tmp_path / "cache"), "DCBENCH_STORE": str(tmp_path / "store.db")}
    return subprocess.run([sys.executable, "-m", "dcbench", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


def test_listed_after_install(plugin_path, tmp_path):
    out = _dcbench(["protocols"], plugin_path, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "example-centroid" in out.stdout
    assert "nearest-class-centroid" in out.stdout
    described = _dcbench(["protocols", "example-centroid"], plugin_path, tmp_path)
    assert "image_size" in described.stdout and "bn_recalibrate" in described.stdout


def test_not_listed_without_install(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dcbench", "protocols"], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "example-centroid" not in out.stdout


def test_eval_stores_one_top1_row_per_tap(plugin_path, tmp_path):
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=6, image_size=40)
    out = _dcbench(["eval", "--protocol", "example-centroid", "--checkpoint", "random:alexnet",
                    "--data", str(data), "--set", "image_size=64", "--set", "workers=0", "--json"],
                   plugin_path, tmp_path)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    taps = ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert [(m["metric"], m["tap"]) for m in record["metrics"]] == [("top1", t) for t in taps]
    assert all(0.0 <= m["value"] <= 100.0 for m in record["metrics"])
    assert record["extra"]["bn_recalibrate"]["ran"] is True  # a random init: re-estimated on a copy
    with ResultStore(tmp_path / "store.db") as store:
        stored = store.results("example-centroid")
    assert len(stored) == 1 and stored[0].data["fingerprint"] == record["data"]["fingerprint"]
    # the cached extractor: a second run reads the features back and gives the same numbers
    again = _dcbench(["eval", "--protocol", "example-centroid", "--checkpoint", "random:alexnet",
                      "--data", str(data), "--set", "image_size=64", "--set", "workers=0", "--json"],
                     plugin_path, tmp_path)
    assert json.loads(again.stdout.strip().splitlines()[-1])["metrics"] == record["metrics"]
    assert any((tmp_path / "cache").rglob("*.npy"))
