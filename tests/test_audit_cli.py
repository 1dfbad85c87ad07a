"""CLI input handling found wanting by an audit: each case is a command a user can type, the
exit code it must give (1 bad input, 2 usage, 130 Ctrl-C), its one-line error, and what must
not happen to the user's files."""
from __future__ import annotations

import errno
import pickle
import zipfile

import pytest
import torch
from click.testing import CliRunner

from dcbench import cli
from dcbench.cli import main
from dcbench.errors import UsageError
from dcbench.settings import apply_settings


def _run(args: list[str], **kwargs):
    return CliRunner().invoke(main, args, **kwargs)


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


# ----------------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("option", ["--classes", "--per-class", "--size"])
def test_fixtures_zero_is_an_error_not_the_default(tmp_path, option):
    out = tmp_path / "data"
    result = _run(["fixtures", "imagefolder", str(out), option, "0"])
    assert result.exit_code == 2, result.output
    assert option in _error_line(result)
    assert not out.exists()


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("value", ["[0.5]", "[0.1,0.5,1]", "abc", "[a,b]"])
def test_fixed_length_tuple_setting_is_a_usage_error(value):
    from dcbench.train import TrainConfig

    with pytest.raises(UsageError, match=r"crop_scale: expected 2 numbers, e.g. --set crop_scale=\["):
        apply_settings(TrainConfig(), {"crop_scale": value})
    assert apply_settings(TrainConfig(), {"crop_scale": "0.2,0.9"}).crop_scale == (0.2, 0.9)
    assert apply_settings(TrainConfig(), {"crop_scale": [0.2, 1]}).crop_scale == (0.2, 1.0)


def test_train_set_short_tuple_is_one_line_exit_2():
    result = _run(["train", "--set", "crop_scale=[0.5]", "--list-settings"])
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output
    assert "crop_scale" in _error_line(result)


def test_bool_for_an_integer_names_the_type():
    from dcbench.train import TrainConfig

    with pytest.raises(UsageError, match="for seed: expected an integer"):
        apply_settings(TrainConfig(), {"seed": True})


def test_v2_with_k_names_prototypes():
    result = _run(["train", "--method", "deepcluster-v2", "--k", "3", "--data", "x"])
    assert result.exit_code == 2
    line = _error_line(result)
    assert "--set prototypes=[K,K,K]" in line
    # the setting the hint names exists for v2
    listed = _run(["train", "--method", "deepcluster-v2", "--list-settings"])
    assert any(row.split()[0] == "prototypes" for row in listed.stdout.splitlines() if row.strip())


# ----------------------------------------------------------------------------- train --resume
def _fake_run(folder, method="deepcluster"):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"data: somewhere\nout: {folder}\nmethod: {method}\n"
                                        f"channels_last: false\n")


def test_resume_with_other_method_says_so(tmp_path):
    run_dir = tmp_path / "run"
    _fake_run(run_dir)
    result = _run(["train", "--out", str(run_dir), "--resume", "--method", "deepcluster-v2"])
    assert result.exit_code == 2
    line = _error_line(result)
    assert "is a deepcluster run" in line and "drop --method" in line and "unknown setting" not in line


def test_resume_without_a_run_says_nothing_to_resume(tmp_path):
    result = _run(["train", "--out", str(tmp_path / "nowhere"), "--resume"])
    assert result.exit_code == 2
    assert "nothing to resume" in _error_line(result)


def test_ctrl_c_during_training_exits_130_and_names_resume(tmp_path, monkeypatch):
    import dcbench.train

    run_dir = tmp_path / "my run"
    data = tmp_path / "images"
    data.mkdir()

    def interrupted(cfg, resume=False):
        run_dir.mkdir()
        (run_dir / "checkpoint.pth").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(dcbench.train, "train", interrupted)
    result = _run(["train", "--data", str(data), "--out", str(run_dir)])
    assert result.exit_code == 130
    assert f"dcbench train --out '{run_dir}' --resume" in _error_line(result)


# ----------------------------------------------------------------------------- checkpoints
class _Unimportable:
    pass


def test_trusted_checkpoint_with_missing_class_names_the_class(tmp_path, monkeypatch):
    path = tmp_path / "obj.pth"
    torch.save({"obj": _Unimportable()}, path)
    assert zipfile.is_zipfile(path)
    monkeypatch.delattr(__import__(__name__), "_Unimportable")  # as on a machine without that code
    result = _run(["checkpoint", "inspect", str(path), "--trust-checkpoint"])
    assert result.exit_code == 1
    line = _error_line(result)
    assert "_Unimportable" in line and "persistent id" not in line


def test_plain_pickle_still_loads_when_trusted(tmp_path):
    from dcbench.checkpoint import read_checkpoint_file

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    assert read_checkpoint_file(path, trust=True) == {"a": 1}


def test_convert_refuses_to_overwrite_its_source(tmp_path):
    import torchvision

    src = tmp_path / "rn18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    before = src.read_bytes()
    result = _run(["checkpoint", "convert", str(src), str(tmp_path / "." / "rn18.pth")])
    assert result.exit_code == 2
    assert "is SRC itself" in _error_line(result)
    assert src.read_bytes() == before


# ----------------------------------------------------------------------------- protocols, compare, leaderboard
@pytest.mark.parametrize("args", [["knn", "--markdown"], ["--markdown", "--json"], ["--markdown", "--set", "ks=[2]"]])
def test_protocols_markdown_with_name_json_or_set_is_usage_error(args):
    result = _run(["protocols", *args])
    assert result.exit_code == 2
    assert "--markdown" in _error_line(result)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from dcbench.fixtures import write_fixture

    return write_fixture("imagefolder", tmp_path_factory.mktemp("if") / "data", classes=2, per_class=2, size=32).root


def test_compare_data_for_an_absent_protocol(tiny_root, tmp_path):
    result = _run(["compare", "random:alexnet", "--protocol", "knn", "--data", f"linear={tiny_root}",
                   "--store", str(tmp_path / "r.db")])
    assert result.exit_code == 2
    assert "'linear' is not one of the --protocol values (knn)" in _error_line(result)


def test_compare_empty_seed_list(tiny_root, tmp_path):
    result = _run(["compare", "random:alexnet", "--protocol", "knn", "--data", str(tiny_root), "--seeds", ",",
                   "--store", str(tmp_path / "r.db")])
    assert result.exit_code == 2
    assert "at least one seed" in result.output
    assert not (tmp_path / "r.db").exists()


def test_leaderboard_without_where_does_not_blame_where(tmp_path):
    from dcbench.results import ResultStore

    store = tmp_path / "r.db"
    ResultStore(store).close()
    result = _run(["leaderboard", "--store", str(store), "--protocol", "knn"])
    assert result.exit_code == 1
    line = _error_line(result)
    assert "no results in the store for knn" in line and "--where" not in line


# ----------------------------------------------------------------------------- demo
def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "keep.bin").write_bytes(b"precious")
    (out / "results.db").write_bytes(b"my results")
    (out / "notes.txt").write_text("mine")
    result = _run(["demo", "--out", str(out)])
    assert result.exit_code == 2
    assert "notes.txt" in _error_line(result)
    assert (out / "cache" / "keep.bin").read_bytes() == b"precious"
    assert (out / "results.db").read_bytes() == b"my results"


def test_demo_accepts_its_own_folder(tmp_path):
    from dcbench.demo import DEMO_ENTRIES, check_out

    for name in DEMO_ENTRIES:
        (tmp_path / name).mkdir()
    (tmp_path / ".leaderboard.md.abc123.tmp").write_text("")  # an interrupted atomic write
    check_out(tmp_path)
    check_out(tmp_path / "new")


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_demo_epochs_below_one(tmp_path, epochs):
    result = _run(["demo", "--out", str(tmp_path / "d"), "--epochs", epochs])
    assert result.exit_code == 2
    assert "--epochs must be at least 1" in _error_line(result)
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- file-system errors
def test_file_where_a_folder_is_needed_is_one_line(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    result = _run(["fixtures", "imagefolder", str(blocker / "data")])
    assert result.exit_code == 1
    line = _error_line(result)
    assert f"cannot use {blocker} (a file where a folder is needed)" in line
    assert "internal error" not in line


def test_os_error_names_the_target_not_the_temporary(tmp_path, monkeypatch):
    monkeypatch.setenv("DCBENCH_CACHE", str(tmp_path / "cache"))
    exc = OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".lb.md.k2j3h4.tmp"))
    assert cli._os_error_message(exc) == (f"cannot use {tmp_path / 'lb.md'} (Read-only file system); "
                                          f"check the path and its permissions, or choose another")
    staged = OSError(errno.EACCES, "Permission denied", str(tmp_path / ".data.partial-12-ab34"))
    assert f"cannot use {tmp_path / 'data'} (Permission denied)" in cli._os_error_message(staged)
    cache = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "cache" / "features"))
    assert cli._os_error_message(cache).endswith("set DCBENCH_CACHE to a writable folder")
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    assert cli._os_error_message(full).endswith("free some space or write elsewhere")
    assert not cli._is_user_os_error(OSError(errno.ENOENT, "gone", cli.__file__))  # dcbench's own file: a bug
    assert not cli._is_user_os_error(OSError(errno.EIO, "I/O error", str(tmp_path / "x")))


def test_os_error_with_debug_keeps_the_traceback(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    result = _run(["--debug", "fixtures", "imagefolder", str(blocker / "data")])
    assert result.exit_code == 1
    assert isinstance(result.exception, OSError)


def test_random_spec_with_bad_sobel_is_an_error_not_off():
    result = _run(["checkpoint", "inspect", "random:alexnet,sobel=maybe,size=64"])
    assert result.exit_code == 1
    assert "use sobel=1 or sobel=0" in _error_line(result)
    on = _run(["checkpoint", "inspect", "random:alexnet,sobel=yes,size=64", "--json"])
    assert on.exit_code == 0 and '"sobel": true' in on.stdout


def test_eval_launch_options_without_launcher(tiny_root, tmp_path):
    result = _run(["eval", "--protocol", "knn", "--checkpoint", "random:alexnet", "--data", str(tiny_root),
                   "--store", str(tmp_path / "r.db"), "--jobs", "2"])
    assert result.exit_code == 2
    assert "--jobs needs --launcher local or --launcher slurm" in _error_line(result)
    assert not (tmp_path / "r.db").exists()


def test_voc_fixture_needs_two_classes(tmp_path):
    # one class: every image is a positive, so the try command's SVMs cannot train (no negatives)
    result = _run(["fixtures", "voc", str(tmp_path / "voc"), "--classes", "1"])
    assert result.exit_code == 2
    assert "--classes must be at least 2 for voc" in _error_line(result)
    assert not (tmp_path / "voc").exists()


def test_binary_config_file_is_a_usage_error(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"\xff\xfe\x00binary")
    result = _run(["train", "--data", str(tmp_path), "--config", str(config)])
    assert result.exit_code == 2
    assert "is not a UTF-8 text file" in _error_line(result)


def test_other_os_errors_stay_one_internal_error_line(tmp_path, monkeypatch):
    import dcbench.fixtures

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "x"))

    monkeypatch.setattr(dcbench.fixtures, "write_fixture", broken)
    result = _run(["fixtures", "imagefolder", str(tmp_path / "data")])
    assert result.exit_code == 1
    assert "internal error OSError" in _error_line(result)


def test_empty_output_paths_are_usage_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "" would be this (empty) folder
    result = _run(["fixtures", "imagefolder", ""])
    assert result.exit_code == 2 and "OUT is empty" in _error_line(result)
    assert not any(tmp_path.iterdir())
    result = _run(["checkpoint", "convert", "random:alexnet,size=64", ""])
    assert result.exit_code == 2 and "DST is empty" in _error_line(result)


# ----------------------------------------------------------------------------- torchrun processes
def _train_returning(monkeypatch, tmp_path, outcome):
    import dcbench.train

    def fake_train(cfg, resume=False):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(dcbench.train, "train", fake_train)
    (tmp_path / "images").mkdir(exist_ok=True)
    return ["train", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_the_run_folder_is_printed_once_under_torchrun(monkeypatch, tmp_path, rank, shown):
    args = _train_returning(monkeypatch, tmp_path, tmp_path / "run")
    out = CliRunner().invoke(main, args, env={"RANK": rank, "WORLD_SIZE": "2"})
    assert out.exit_code == 0, out.output
    assert (f"run folder: {tmp_path / 'run'}" in out.output) is shown


def test_a_process_left_by_a_stopped_peer_says_so_instead_of_an_internal_error(monkeypatch, tmp_path):
    """gloo's error in the process that stays when another one exits (its own error line says why)."""
    gone = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:7079. This is typically caused by a remote worker crashing.")
    args = _train_returning(monkeypatch, tmp_path, gone)
    out = CliRunner().invoke(main, args, env={"RANK": "0", "WORLD_SIZE": "2"})
    assert out.exit_code == 1
    assert out.output.strip() == ("error: process 0 of this torchrun job stopped because another one ended first "
                                  "(its error line says why)")
    alone = CliRunner().invoke(main, args, env={"RANK": None, "WORLD_SIZE": None})  # one process: a bug
    assert alone.exit_code == 1 and "internal error RuntimeError" in alone.output


@pytest.mark.parametrize("command", [["results", "list"], ["leaderboard"]])
def test_an_empty_store_path_is_a_usage_error_not_the_default_store(command):
    out = CliRunner().invoke(main, command + ["--store", ""])
    assert out.exit_code == 2 and "--store': is empty" in out.output, out.output


def test_eval_with_an_empty_store_path_is_a_usage_error(tmp_path):
    from dcbench.data.synthetic import make_image_folder

    root = make_image_folder(tmp_path / "if", n_classes=2, per_class=2, image_size=32)
    out = CliRunner().invoke(main, ["eval", "--protocol", "knn", "--checkpoint", "random:alexnet", "--data", str(root),
                                    "--store", ""])
    assert out.exit_code == 2 and "--store': is empty" in out.output, out.output
