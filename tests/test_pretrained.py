"""Pretrained registry: the manifest, converters of the published layouts, resumable verified
downloads from a local HTTP server (127.0.0.1 only), `pretrained add`, and `pretrained:NAME`
through resolve_checkpoint / load_backbone / `dcbench eval`.

The fake checkpoints keep the real key layouts but small archs (AlexNet at 64 px, ResNet-18,
SqueezeNet); a test manifest points at the local server."""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
import tomllib
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

import dcbench
from dcbench.checkpoint import load_checkpoint, resolve_checkpoint
from dcbench.cli import main
from dcbench.errors import CheckpointError
from dcbench.models import build_backbone
from dcbench.pretrained import download, registry
from dcbench.pretrained.cli import pretrained_group
from dcbench.converters import convert, converters

if "pretrained" not in main.commands:  # dcbench/cli.py registers it; tests must not depend on that
    main.add_command(pretrained_group, "pretrained")

REQUIRED = {"deepcluster-alexnet", "deepcluster-vgg16", "deepcluster-vgg16-yfcc", "dcv2-rn50-800ep",
            "dcv2-rn50-400ep", "supervised-alexnet-tv"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- fake published files
def _deepcluster_bytes(path: Path) -> dict[str, torch.Tensor]:
    """Original DeepCluster layout: DataParallel features.module.N, classifier, top_layer, sobel."""
    torch.manual_seed(1)
    sd = build_backbone("alexnet", sobel=True, input_size=64).state_dict()
    state = {k.replace("features.", "features.module.", 1): v for k, v in sd.items()}
    state["top_layer.weight"], state["top_layer.bias"] = torch.randn(10, 4096), torch.zeros(10)
    torch.save({"epoch": 500, "arch": "alexnet", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "momentum": 0.9, "params": [0, 1]}]}},
               path)
    return sd


def _swav_bytes(path: Path) -> dict[str, torch.Tensor]:
    """facebookresearch/swav release layout: bare state dict, module.-prefixed torchvision ResNet
    trunk, projection_head MLP and DeepCluster-v2's three prototype heads."""
    torch.manual_seed(2)
    trunk = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
             if not k.startswith("fc.")}
    heads = {"projection_head.0.weight": torch.randn(64, 512), "projection_head.0.bias": torch.zeros(64),
             "projection_head.1.weight": torch.ones(64), "projection_head.1.bias": torch.zeros(64),
             "projection_head.1.running_mean": torch.zeros(64), "projection_head.1.running_var": torch.ones(64),
             "projection_head.1.num_batches_tracked": torch.tensor(0),
             "projection_head.3.weight": torch.randn(16, 64), "projection_head.3.bias": torch.zeros(16),
             **{f"prototypes.prototypes{i}.weight": torch.randn(30, 16) for i in range(3)}}
    torch.save({f"module.{k}": v for k, v in {**trunk, **heads}.items()}, path)
    return trunk


def _trust_bytes(path: Path) -> dict[str, torch.Tensor]:
    """DeepCluster layout plus an argparse.Namespace (as training scripts save their args): it
    loads only with full unpickling (--trust-checkpoint)."""
    import argparse

    torch.manual_seed(4)
    sd = build_backbone("alexnet", sobel=True, input_size=64).state_dict()
    state = {k.replace("features.", "features.module.", 1): v for k, v in sd.items()}
    torch.save({"epoch": 1, "arch": "alexnet", "state_dict": state, "args": argparse.Namespace(lr=0.05)}, path)
    return sd


def _torchvision_bytes(path: Path) -> dict[str, torch.Tensor]:
    """torchvision release layout: the model's bare state dict."""
    torch.manual_seed(3)
    sd = torchvision.models.squeezenet1_1(weights=None).state_dict()
    torch.save(sd, path)
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (path, bytes, expected native weights) of the fake published files."""
    root = tmp_path_factory.mktemp("published")
    out = {}
    for name, make, filename in [("dc", _deepcluster_bytes, "checkpoint.pth.tar"),
                                 ("swav", _swav_bytes, "deepclusterv2_pretrain.pth.tar"),
                                 ("tv", _torchvision_bytes, "squeezenet1_1.pth"),
                                 ("trust", _trust_bytes, "trust.pth.tar")]:
        path = root / filename
        weights = make(path)
        out[name] = (path, path.read_bytes(), weights)
    return out


# ----------------------------------------------------------------------------- local HTTP server
def etag(data: bytes) -> str:
    return f'"{sha(data)[:16]}"'


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with Range and If-Range support (a strong ETag per content;
    an If-Range naming another version gets the whole file, RFC 9110); ``server.cut[path] = n``
    makes the next full (non-Range) response for ``path`` stop after n bytes and drop the
    connection; ``server.redirects[path] = url`` answers 302 to ``url``."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        srv.if_ranges.append(self.headers.get("If-Range"))
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        if rng and not srv.ignore_if_range and self.headers.get("If-Range") not in (None, etag(data)):
            rng = None  # the client's partial is another version: send the whole file
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if srv.send_etag:
            self.send_header("ETag", etag(data))
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = None if rng else srv.cut.pop(self.path, None)
        if cut is None:
            self.wfile.write(data[start:])
            return
        self.wfile.write(data[:cut])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)  # the transfer breaks off mid-file
        self.close_connection = True

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:  # the socket was shut down on purpose
            pass

    def log_message(self, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up mid-response is expected here


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 in a thread; stops at teardown or after 120 s on its own."""
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.cut, srv.requests, srv.if_ranges, srv.redirects = {}, {}, [], [], {}
    srv.send_etag, srv.ignore_if_range = True, False
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(120, srv.shutdown)
    watchdog.daemon = True
    watchdog.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    watchdog.cancel()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def manifest(tmp_path, monkeypatch, server, files):
    """A test manifest of small checkpoints served by ``server``; returns a dict of helpers."""
    bad = b"PK" + b"\0" * 1000  # starts like a torch zip, but is not the published file
    html = b"<html><body>Service Unavailable</body></html>"
    server.files.update({"/dc/checkpoint.pth.tar": files["dc"][1], "/swav/dcv2.pth.tar": files["swav"][1],
                         "/trust/checkpoint.pth.tar": files["trust"][1],
                         "/tv/squeezenet1_1-aaaa.pth": files["tv"][1], "/bad/file.pth": bad,
                         "/html/file.pth": html})
    entries = {
        "tiny-dc": dict(url="/dc/checkpoint.pth.tar", arch="alexnet", input_size=64, fmt="deepcluster"),
        "tiny-swav": dict(url="/swav/dcv2.pth.tar", arch="tv:resnet18", input_size=224, fmt="swav"),
        "tiny-trust": dict(url="/trust/checkpoint.pth.tar", arch="alexnet", input_size=64, fmt="deepcluster"),
        "tiny-tv": dict(url="/tv/squeezenet1_1-aaaa.pth", arch="tv:squeezenet1_1", input_size=224,
                        fmt="state_dict", sha256=sha(files["tv"][1])),
        "tiny-bad": dict(url="/bad/file.pth", arch="tv:squeezenet1_1", input_size=224, fmt="state_dict",
                         sha256=sha(files["tv"][1])),
        "tiny-html": dict(url="/html/file.pth", arch="tv:squeezenet1_1", input_size=224, fmt="state_dict"),
        "tiny-offline": dict(url=f"http://127.0.0.1:{_closed_port()}/x.pth", arch="alexnet", input_size=64,
                             fmt="deepcluster"),
    }
    lines = ["schema = 1"]
    for name, e in entries.items():
        url = e["url"] if e["url"].startswith("http") else server.url + e["url"]
        lines += [f"[checkpoints.{name}]", f'description = "test {name}"', f'url = "{url}"',
                  'url_source = "test"', f'arch = "{e["arch"]}"', f'input_size = {e["input_size"]}',
                  f'source_format = "{e["fmt"]}"', f'converter = "{e["fmt"]}"']
        if "sha256" in e:
            lines += [f'sha256 = "{e["sha256"]}"', 'sha256_source = "computed by the test from its own bytes"']
        lines += [f"[checkpoints.{name}.input]", "mean = [0.485, 0.456, 0.406]",
                  "std = [0.229, 0.224, 0.225]", f'sobel = {"true" if e["arch"] == "alexnet" else "false"}']
    path = tmp_path / "manifest.toml"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(registry, "MANIFEST_PATH", path)
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(download, "TIMEOUT_S", 10.0)
    monkeypatch.setattr(download, "INSECURE_HOSTS", frozenset({"127.0.0.1"}))  # the local test server
    return entries


def cache_dir() -> Path:
    return registry.pretrained_dir()


def lock() -> dict:
    return registry.read_lock()


# ----------------------------------------------------------------------------- the real manifest
def test_manifest_lists_the_published_checkpoints():
    entries = registry.load_manifest()
    assert REQUIRED <= set(entries)
    known_archs = {"alexnet", "vgg16"}
    tv_models = set(torchvision.models.list_models(module=torchvision.models))
    for e in entries.values():
        assert e.url.startswith(("https://dl.fbaipublicfiles.com/deepcluster/", "https://download.pytorch.org/models/"))
        assert e.arch in known_archs or e.arch.removeprefix("tv:") in tv_models
        assert e.converter in converters()
        assert set(e.input) >= {"mean", "std", "sobel"} and e.input["sobel"] == (e.arch in known_archs)
        for ref in e.references:
            assert ref.source and ref.values
    # torchvision: the manifest's URL is torchvision's own, and the prefix is the one in its name
    tv = entries["supervised-alexnet-tv"]
    assert tv.url == torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    assert tv.sha256_prefix == re.search(r"-([a-f0-9]+)\.", tv.url).group(1)
    # every full sha256 says where it comes from, and agrees with the published prefix
    for e in entries.values():
        assert (e.sha256 is None) or (e.sha256_source and e.sha256.startswith(e.sha256_prefix or ""))
    assert tv.sha256 and entries["supervised-resnet50-tv"].sha256
    table1 = entries["deepcluster-alexnet"].references[0]
    assert table1.values == {"conv1": 12.9, "conv2": 29.2, "conv3": 38.2, "conv4": 39.8, "conv5": 36.1}
    assert "Table 1" in table1.source
    assert entries["dcv2-rn50-800ep"].references[0].best()[1] == 75.2
    assert entries["dcv2-rn50-800ep"].extension == ".pth.tar" and tv.extension == ".pth"


def test_list_shows_every_entry_and_cache_state():
    result = cli("pretrained", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["name", "arch", "source", "cached"]
    for name in REQUIRED:
        row = next(line for line in lines if line.startswith(name + " "))
        assert " no " in row
    assert "imagenet-linear top1 39.8 (conv4)" in result.output
    data = json.loads(cli("pretrained", "list", "--json").output)
    assert data["dcv2-rn50-800ep"]["arch"] == "tv:resnet50" and data["dcv2-rn50-800ep"]["cached"] == "no"


def test_manifest_file_is_valid_toml_with_schema():
    data = tomllib.loads(registry.MANIFEST_PATH.read_text())
    assert data["schema"] == 1


# ----------------------------------------------------------------------------- converters
def test_swav_converter_keeps_trunk_and_drops_heads(files):
    path, _, trunk = files["swav"]
    converted = convert(torch.load(path, weights_only=True))
    assert converted.format == "swav" and set(converted.state_dict) == set(trunk)
    assert "projection_head.0.weight" in converted.head_keys
    assert "prototypes.prototypes2.weight" in converted.head_keys
    loaded = load_checkpoint(path, arch="tv:resnet18")
    assert loaded.report.missing == [] and loaded.report.unexpected == []
    torch.testing.assert_close(loaded.backbone.model.layer4[1].conv2.weight, trunk["layer4.1.conv2.weight"])
    # a training checkpoint ({'state_dict', 'epoch', ...}) is the same format
    wrapped = convert({"epoch": 800, "state_dict": torch.load(path, weights_only=True), "optimizer": {}})
    assert wrapped.format == "swav" and wrapped.meta == {"epoch": 800}


def test_deepercluster_converter_and_original_layout_unchanged(files):
    t = torch.zeros(2)
    obj = {"epoch": 3, "start_iter": 0, "state_dict": {
        "module.body.features.0.weight": t, "module.body.classifier.0.weight": t,
        "module.sobel.0.weight": t, "module.pred_layer.weight": t, "module.pred_layer.bias": t}}
    converted = convert(obj)
    assert converted.format == "deepercluster"
    assert set(converted.state_dict) == {"features.0.weight", "classifier.0.weight", "sobel.0.weight"}
    assert converted.head_keys == ["pred_layer.bias", "pred_layer.weight"] and converted.meta == {"epoch": 3}
    assert convert(torch.load(files["dc"][0], weights_only=True)).format == "deepcluster"


# ----------------------------------------------------------------------------- downloads
def test_interrupted_transfer_is_resumed(manifest, server, files):
    data = files["swav"][1]
    server.cut["/swav/dcv2.pth.tar"] = len(data) // 3
    result = cli("pretrained", "download", "tiny-swav")
    assert result.exit_code == 0, result.output
    assert server.requests == [("/swav/dcv2.pth.tar", None), ("/swav/dcv2.pth.tar", f"bytes={len(data) // 3}-")]
    assert server.if_ranges == [None, etag(data)]  # the resume names the version it continues
    path = cache_dir() / "tiny-swav.pth.tar"
    assert path.read_bytes() == data and not (cache_dir() / "tiny-swav.part").exists()
    assert lock()["tiny-swav"]["sha256"] == sha(data) and lock()["tiny-swav"]["source"] == "download"
    assert f"sha256 {sha(data)}" in result.output


def test_partial_download_is_resumed_by_the_next_command(manifest, server, files, monkeypatch):
    data = files["tv"][1]
    cut = len(data) // 2
    server.cut["/tv/squeezenet1_1-aaaa.pth"] = cut
    monkeypatch.setattr(download, "ATTEMPTS", 1)
    first = cli("pretrained", "download", "tiny-tv")
    assert first.exit_code == 1 and len(error_lines(first)) == 1
    assert "interrupted" in first.output and "again to resume" in first.output
    assert (cache_dir() / "tiny-tv.part").stat().st_size == cut and "tiny-tv" not in lock()
    second = cli("pretrained", "download", "tiny-tv")
    assert second.exit_code == 0, second.output
    assert server.requests[-1] == ("/tv/squeezenet1_1-aaaa.pth", f"bytes={cut}-")
    assert (cache_dir() / "tiny-tv.pth").read_bytes() == data  # the manifest's sha256 matched
    again = cli("pretrained", "download", "tiny-tv")  # cached: verified, no request
    assert again.exit_code == 0 and len(server.requests) == 2


@pytest.mark.parametrize("name, reason", [("tiny-bad", "differs from the published"),
                                          ("tiny-html", "not a PyTorch file")])
def test_corrupted_download_is_refused_and_removed(manifest, name, reason):
    result = cli("pretrained", "download", name)
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "corrupted" in line and reason in line and "removed it" in line
    assert not list(cache_dir().glob(f"{name}*")) and name not in lock()


def test_offline_names_the_url_and_the_add_command(manifest):
    url = registry.get_entry("tiny-offline").url
    result = cli("checkpoint", "inspect", "pretrained:tiny-offline")
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert url in line and "dcbench pretrained add tiny-offline FILE" in line
    assert not list(cache_dir().glob("tiny-offline*"))


def test_http_error_is_one_line(manifest, server):
    server.files.pop("/swav/dcv2.pth.tar")
    result = cli("pretrained", "download", "tiny-swav")
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "HTTP 404" in line and "pretrained add tiny-swav FILE" in line


# ----------------------------------------------------------------------------- pretrained:NAME
def test_pretrained_spec_downloads_once_and_verifies_every_load(manifest, server, files):
    loaded = resolve_checkpoint("pretrained:tiny-swav")
    assert loaded.name == "pretrained:tiny-swav" and loaded.format == "swav"
    assert loaded.backbone.arch == "tv:resnet18" and loaded.identity()["name"] == "pretrained:tiny-swav"
    assert loaded.meta["file_sha256"] == lock()["tiny-swav"]["sha256"] == sha(files["swav"][1])
    assert any(k.startswith("prototypes.") for k in loaded.report.ignored_heads)
    backbone = dcbench.load_backbone("pretrained:tiny-swav")
    torch.testing.assert_close(backbone.model.conv1.weight, files["swav"][2]["conv1.weight"])
    assert len(server.requests) == 1  # downloaded once
    with open(cache_dir() / "tiny-swav.pth.tar", "ab") as f:  # the cached file changes behind our back
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="corrupted or was replaced.*--force"):
        resolve_checkpoint("pretrained:tiny-swav")


def test_file_placed_by_hand_without_checksum_is_not_trusted(manifest, files):
    cache_dir().mkdir(parents=True)
    (cache_dir() / "tiny-dc.pth.tar").write_bytes(files["dc"][1])
    assert "unverified" in cli("pretrained", "list").output
    with pytest.raises(CheckpointError, match="pretrained add tiny-dc FILE"):
        resolve_checkpoint("pretrained:tiny-dc")
    # with a published checksum, a matching file placed by hand is adopted
    (cache_dir() / "tiny-tv.pth").write_bytes(files["tv"][1])
    assert resolve_checkpoint("pretrained:tiny-tv").meta["file_sha256"] == lock()["tiny-tv"]["sha256"]


def test_unknown_name_lists_the_known_ones(manifest):
    result = cli("pretrained", "path", "nope")
    assert result.exit_code == 1 and "unknown pretrained checkpoint 'nope'" in result.output
    assert "tiny-dc" in result.output
    with pytest.raises(CheckpointError, match="unknown pretrained"):
        resolve_checkpoint("pretrained:nope")


# ----------------------------------------------------------------------------- add
def test_add_refuses_a_file_of_the_wrong_structure(manifest, files, tmp_path):
    wrong_arch = files["swav"][0]  # a ResNet, not the SqueezeNet tiny-html is
    result = cli("pretrained", "add", "tiny-html", str(wrong_arch))
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "does not match arch tv:squeezenet1_1" in line
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    result = cli("pretrained", "add", "tiny-html", str(text))
    assert result.exit_code == 1 and "not a PyTorch checkpoint" in result.output
    result = cli("pretrained", "add", "tiny-tv", str(files["dc"][0]))  # the manifest's sha256 decides first
    assert result.exit_code == 1 and "is not the published tiny-tv" in result.output
    assert not list(cache_dir().glob("tiny-*")) and lock() == {}


def test_added_file_works_in_eval(manifest, server, files, tmp_path):
    from dcbench.data.synthetic import make_image_folder

    added = cli("pretrained", "add", "tiny-dc", str(files["dc"][0]))
    assert added.exit_code == 0, added.output
    assert "structure: format deepcluster, arch alexnet" in added.output and "2 head keys ignored" in added.output
    path = cli("pretrained", "path", "tiny-dc")
    assert path.exit_code == 0 and Path(path.output.strip()) == cache_dir() / "tiny-dc.pth.tar"
    assert lock()["tiny-dc"]["source"] == "add"
    assert re.search(r"^tiny-dc\s+alexnet\s+deepcluster\s+yes", cli("pretrained", "list").output, re.M)

    root = make_image_folder(tmp_path / "data", n_classes=3, per_class=4, image_size=32)
    result = cli("eval", "--protocol", "knn", "--checkpoint", "pretrained:tiny-dc", "--data", str(root),
                 "--set", "image_size=64", "--set", "batch_size=16", "--set", "workers=0", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["checkpoint"]["name"] == "pretrained:tiny-dc" and record["checkpoint"]["arch"] == "alexnet"
    expected = load_checkpoint(files["dc"][0], arch="alexnet", input_size=64)
    assert record["checkpoint"]["sha256"] == expected.sha256
    assert server.requests == []  # placed with add: nothing downloaded


def test_add_refuses_a_mismatch_in_one_line_naming_what_differs(manifest, files, tmp_path):
    from dcbench.checkpoint import save_checkpoint

    own = tmp_path / "mine.pth"  # a dcbench-format AlexNet trained at 96 px: not the published tiny-dc
    save_checkpoint(own, build_backbone("alexnet", input_size=96, seed=1))
    result = cli("pretrained", "add", "tiny-dc", str(own))
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "is not the published tiny-dc" in line and "format dcbench (manifest: deepcluster)" in line
    assert "input size 96 (manifest: 64)" in line and "--force" in line
    assert not list(cache_dir().glob("tiny-dc*")) and "tiny-dc" not in lock()


def test_add_refuses_a_file_other_than_the_pinned_one(manifest, server, files, tmp_path):
    assert cli("pretrained", "download", "tiny-swav").exit_code == 0  # pins its sha256 in lock.json
    other = tmp_path / "other.pth.tar"
    torch.save({f"module.{k}": v + 1 for k, v in torch.load(files["swav"][0], weights_only=True).items()}, other)
    result = cli("pretrained", "add", "tiny-swav", str(other))
    assert result.exit_code == 1 and "pinned in" in result.output and "(download)" in result.output
    assert lock()["tiny-swav"]["sha256"] == sha(files["swav"][1])


def test_forced_add_is_recorded_unverified_and_tables_say_so(manifest, files, tmp_path):
    from dcbench.checkpoint import save_checkpoint
    from dcbench.data.synthetic import make_image_folder

    own = tmp_path / "mine.pth"
    save_checkpoint(own, build_backbone("alexnet", input_size=64, seed=1))
    added = cli("pretrained", "add", "tiny-dc", str(own), "--force")
    assert added.exit_code == 0, added.output
    assert "UNVERIFIED (format dcbench (manifest: deepcluster))" in added.output
    assert lock()["tiny-dc"]["unverified"] == "format dcbench (manifest: deepcluster)"
    assert re.search(r"^tiny-dc\s+alexnet\s+deepcluster\s+forced \(unverified\)", cli("pretrained", "list").output,
                     re.M)
    assert resolve_checkpoint("pretrained:tiny-dc").meta["unverified"].startswith("format dcbench")
    root = make_image_folder(tmp_path / "data", n_classes=3, per_class=4, image_size=32)
    store = tmp_path / "r.db"
    result = cli("eval", "--protocol", "knn", "--checkpoint", "pretrained:tiny-dc", "--data", str(root), "--store",
                 str(store), "--set", "image_size=64", "--set", "batch_size=16", "--set", "workers=0",
                 "--set", "ks=[10]", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["extra"]["checkpoint_unverified"] is True
    items = json.loads(cli("leaderboard", "--store", str(store), "--format", "json").stdout)
    assert {i["checkpoint"] for i in items} == {"pretrained:tiny-dc [unverified]"}
    assert all(i["unverified"] for i in items)


# ----------------------------------------------------------------------------- trust needs a pinned sha256
def test_trust_checkpoint_on_an_unpinned_entry_is_refused_until_pinned(manifest, server, files):
    data = files["trust"][1]
    with pytest.raises(CheckpointError, match="needs full unpickling.*dcbench pretrained pin tiny-trust SHA256"):
        resolve_checkpoint("pretrained:tiny-trust", trust=True)
    assert lock()["tiny-trust"]["needs_unpickling"] is True  # probed once (weights_only), then remembered
    result = cli("checkpoint", "inspect", "pretrained:tiny-trust", "--trust-checkpoint")
    assert result.exit_code == 1 and len(error_lines(result)) == 1 and "pretrained pin" in result.output
    wrong = cli("pretrained", "pin", "tiny-trust", "0" * 64)  # not the cached file
    assert wrong.exit_code == 1 and "--force --sha256" in wrong.output and "tiny-trust" not in registry.read_pins()
    bad = cli("pretrained", "pin", "tiny-trust", "xyz")
    assert bad.exit_code == 2 and "64 hex digits" in bad.output
    pinned = cli("pretrained", "pin", "tiny-trust", sha(data).upper())
    assert pinned.exit_code == 0, pinned.output
    assert registry.read_pins()["tiny-trust"]["sha256"] == sha(data)
    loaded = resolve_checkpoint("pretrained:tiny-trust", trust=True)
    torch.testing.assert_close(loaded.backbone.backbone_state_dict()["features.0.weight"],
                               files["trust"][2]["features.0.weight"])
    with pytest.raises(CheckpointError, match="pass --trust-checkpoint"):  # trust is still the caller's choice
        resolve_checkpoint("pretrained:tiny-trust")
    assert json.loads(cli("pretrained", "list", "--json").output)["tiny-trust"]["pinned_sha256"] == sha(data)
    assert len(server.requests) == 1


def test_weights_only_entries_need_no_pin(manifest, server, files):
    loaded = resolve_checkpoint("pretrained:tiny-dc", trust=True)  # trust is harmless: nothing to unpickle
    assert loaded.format == "deepcluster" and lock()["tiny-dc"]["needs_unpickling"] is False


def test_add_with_trust_needs_the_sha256_it_was_checked_against(manifest, files):
    path, data = files["trust"][0], files["trust"][1]
    refused = cli("pretrained", "add", "tiny-trust", str(path), "--trust-checkpoint")
    assert refused.exit_code == 1 and "--sha256 SHA256" in refused.output and not list(cache_dir().glob("tiny-*"))
    wrong = cli("pretrained", "add", "tiny-trust", str(path), "--trust-checkpoint", "--sha256", "1" * 64)
    assert wrong.exit_code == 1 and "not the file you checked" in wrong.output and "tiny-trust" not in lock()
    added = cli("pretrained", "add", "tiny-trust", str(path), "--trust-checkpoint", "--sha256", sha(data))
    assert added.exit_code == 0, added.output
    assert registry.read_pins()["tiny-trust"]["source"] == "add --sha256"
    assert resolve_checkpoint("pretrained:tiny-trust", trust=True).format == "deepcluster"


def test_download_sha256_option_pins_and_refuses_another_file(manifest, server, files):
    data = files["swav"][1]
    wrong = cli("pretrained", "download", "tiny-swav", "--sha256", "2" * 64)
    assert wrong.exit_code == 1 and "corrupted" in wrong.output and "pinned by your pin" in wrong.output
    assert not (cache_dir() / "tiny-swav.pth.tar").exists()
    right = cli("pretrained", "download", "tiny-swav", "--sha256", sha(data))
    assert right.exit_code == 0, right.output
    assert registry.read_pins()["tiny-swav"]["sha256"] == sha(data) and lock()["tiny-swav"]["sha256"] == sha(data)
    two = cli("pretrained", "download", "tiny-swav", "tiny-dc", "--sha256", sha(data))
    assert two.exit_code == 2 and "one NAME" in two.output


def test_manifest_refuses_another_pin(manifest):
    result = cli("pretrained", "pin", "tiny-tv", "3" * 64)
    assert result.exit_code == 1 and "the manifest already pins" in result.output


# ----------------------------------------------------------------------------- https only
def test_plain_http_is_refused_without_a_request(manifest, server, monkeypatch):
    monkeypatch.setattr(download, "INSECURE_HOSTS", frozenset())
    result = cli("pretrained", "download", "tiny-swav")
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "only over https" in line and "pretrained add tiny-swav FILE" in line
    assert server.requests == []


def test_redirect_to_http_is_refused(manifest, server):
    server.redirects["/swav/dcv2.pth.tar"] = "http://example.invalid/dcv2.pth.tar"  # a downgrade
    result = cli("pretrained", "download", "tiny-swav")
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "redirects to http://example.invalid/dcv2.pth.tar" in line and "not https" in line
    assert len(server.requests) == 1 and not list(cache_dir().glob("tiny-swav*"))


def test_redirect_handler_follows_https_only():
    handler = download._HttpsOnlyRedirects()
    req = urllib.request.Request("https://example.org/a.pth", headers={"Range": "bytes=5-", "If-Range": '"e"'})
    followed = handler.redirect_request(req, None, 302, "Found", {}, "https://cdn.example.org/a.pth")
    assert followed.full_url == "https://cdn.example.org/a.pth"
    assert followed.get_header("Range") == "bytes=5-" and followed.get_header("If-range") == '"e"'
    for target in ("http://cdn.example.org/a.pth", "ftp://example.org/a.pth", "file:///etc/passwd"):
        with pytest.raises(CheckpointError, match="not https"):
            handler.redirect_request(req, None, 301, "Moved", {}, target)


# ----------------------------------------------------------------------------- If-Range on resume
def _other_version(files, tmp_path) -> bytes:
    """A second, valid release of the swav file (same layout, other weights)."""
    other = tmp_path / "other.pth.tar"
    torch.save({k: v + 1 for k, v in torch.load(files["swav"][0], weights_only=True).items()}, other)
    return other.read_bytes()


def test_a_file_changed_on_the_server_is_never_spliced(manifest, server, files, monkeypatch, tmp_path):
    old, new = files["swav"][1], _other_version(files, tmp_path)
    cut = len(old) // 3
    server.cut["/swav/dcv2.pth.tar"] = cut
    monkeypatch.setattr(download, "ATTEMPTS", 1)
    assert cli("pretrained", "download", "tiny-swav").exit_code == 1
    server.files["/swav/dcv2.pth.tar"] = new  # the published file changes before the resume
    result = cli("pretrained", "download", "tiny-swav")
    assert server.requests[-1] == ("/swav/dcv2.pth.tar", f"bytes={cut}-") and server.if_ranges[-1] == etag(old)
    # If-Range did not match: the server sent the whole new file, which replaced the partial one
    assert result.exit_code == 0, result.output
    assert (cache_dir() / "tiny-swav.pth.tar").read_bytes() == new and lock()["tiny-swav"]["sha256"] == sha(new)


def test_a_server_ignoring_if_range_is_caught_by_the_etag(manifest, server, files, monkeypatch, tmp_path):
    old, new = files["swav"][1], _other_version(files, tmp_path)
    server.cut["/swav/dcv2.pth.tar"] = len(old) // 3
    monkeypatch.setattr(download, "ATTEMPTS", 1)
    assert cli("pretrained", "download", "tiny-swav").exit_code == 1
    server.files["/swav/dcv2.pth.tar"] = new
    server.ignore_if_range = True  # answers the Range with the new file's bytes (206, new ETag)
    monkeypatch.setattr(download, "ATTEMPTS", 2)
    result = cli("pretrained", "download", "tiny-swav")
    assert result.exit_code == 0, result.output
    assert [r[1] for r in server.requests[1:]] == [f"bytes={len(old) // 3}-", None]  # refused, then a full GET
    assert (cache_dir() / "tiny-swav.pth.tar").read_bytes() == new


def test_a_stale_validator_gets_the_whole_file(manifest, server, files, monkeypatch):
    data = files["tv"][1]
    server.cut["/tv/squeezenet1_1-aaaa.pth"] = len(data) // 2
    monkeypatch.setattr(download, "ATTEMPTS", 1)
    assert cli("pretrained", "download", "tiny-tv").exit_code == 1
    validators = json.loads((cache_dir() / "tiny-tv.part.json").read_text())
    assert validators["etag"] == etag(data)
    (cache_dir() / "tiny-tv.part.json").write_text(json.dumps({**validators, "etag": '"older"'}))
    monkeypatch.setattr(download, "ATTEMPTS", 2)
    # the handler sees If-Range "older" != its ETag and sends the whole file (200): starts over
    result = cli("pretrained", "download", "tiny-tv")
    assert result.exit_code == 0, result.output
    assert (cache_dir() / "tiny-tv.pth").read_bytes() == data and not (cache_dir() / "tiny-tv.part.json").exists()


def test_resume_without_a_validator_starts_over(manifest, server, files, monkeypatch):
    data = files["tv"][1]
    server.send_etag = False  # no ETag, no Last-Modified: the partial's version is unknown
    server.cut["/tv/squeezenet1_1-aaaa.pth"] = len(data) // 2
    monkeypatch.setattr(download, "ATTEMPTS", 1)
    assert cli("pretrained", "download", "tiny-tv").exit_code == 1
    result = cli("pretrained", "download", "tiny-tv")
    assert result.exit_code == 0, result.output
    assert server.requests[-1] == ("/tv/squeezenet1_1-aaaa.pth", None)  # a full GET, no Range
    assert (cache_dir() / "tiny-tv.pth").read_bytes() == data


def test_if_range_prefers_a_strong_etag():
    assert download._if_range({"etag": '"abc"', "last_modified": "Tue, 01 Jul 2025 00:00:00 GMT"}) == '"abc"'
    assert download._if_range({"etag": 'W/"abc"', "last_modified": "Tue, 01 Jul 2025 00:00:00 GMT"}) == \
        "Tue, 01 Jul 2025 00:00:00 GMT"
    assert download._if_range({"etag": 'W/"abc"'}) is None and download._if_range({}) is None


def test_trust_is_never_used_on_a_file_other_than_the_pinned_one(manifest, files, tmp_path):
    # tiny-tv pins the squeezenet file: another file is refused before anything unpickles it
    result = cli("pretrained", "add", "tiny-tv", str(files["trust"][0]), "--trust-checkpoint", "--force",
                 "--sha256", sha(files["trust"][1]))
    assert result.exit_code == 1 and "refusing to unpickle it fully" in result.output
    assert not list(cache_dir().glob("tiny-tv*"))
