"""Fetching the published sets: what is asked of the hub, unpacking once and safely, the next commands, the
folder's claim, success only for complete files, and a clear stop offline."""

import fnmatch
import io
import json
import os
import tarfile
import zipfile

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.file_download import DryRunFileInfo

from mme5.data import fetch

COMMIT = "c0ffee"


def fake_hub(calls, files, short=()):
    """A snapshot_download over `files` (path → bytes) filtered by allow_patterns: the dry run lists them, the
    download records its arguments and writes them into local_dir (`short`: paths it leaves cut)."""

    def snapshot_download(repo_id, dry_run=False, **kwargs):
        patterns = kwargs["allow_patterns"]
        chosen = {path: data for path, data in files.items()
                  if patterns is None or any(fnmatch.fnmatch(path, p) for p in patterns)}
        if dry_run:
            return [DryRunFileInfo(COMMIT, len(data), path, str(kwargs["local_dir"] / path), False, True)
                    for path, data in chosen.items()]
        calls.append({"repo_id": repo_id, **kwargs})
        for path, data in chosen.items():
            target = kwargs["local_dir"] / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():  # as the hub client: what is there is not fetched again
                target.write_bytes(data[: len(data) // 2] if path in short else data)
        return str(kwargs["local_dir"])

    return snapshot_download


def go_offline(monkeypatch):
    """The real hub client, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def zip_bytes(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


CARD = b"---\nlicense: apache-2.0\n---\n# a data set\n"


def test_a_training_set_is_fetched_unpacked_once_and_the_next_commands_printed(tmp_path, monkeypatch, capsys):
    calls = []
    files = {"README.md": CARD, "ImageNet_1K/train-00000-of-00001.parquet": b"PAR1",
             "images/ImageNet_1K.zip": zip_bytes({"ImageNet_1K/0.jpg": b"jpeg-0"}),
             "images/ImageNet_1K-more.tar.gz": tar_bytes({"ImageNet_1K/1.jpg": b"jpeg-1"})}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(calls, files))
    out = tmp_path / "hardneg"
    assert fetch.main(["--dataset", "mme5-hardneg", "--out", str(out), "--subset", "ImageNet_1K"]) == 0
    assert calls == [{"repo_id": "intfloat/mmE5-MMEB-hardneg", "repo_type": "dataset", "local_dir": out,
                      "allow_patterns": ["*ImageNet_1K*", "README.md"], "revision": COMMIT, "token": None}]
    assert (out / "images" / "ImageNet_1K" / "0.jpg").read_bytes() == b"jpeg-0"
    assert (out / "images" / "ImageNet_1K" / "1.jpg").read_bytes() == b"jpeg-1"
    printed = capsys.readouterr().out
    assert "intfloat/mmE5-MMEB-hardneg" in printed and "licence: apache-2.0" in printed
    assert (f"python -m mme5.data.convert --input {out / 'ImageNet_1K'} --images {out} "
            f"--out data/shards/hardneg/ImageNet_1K") in printed

    (out / "images" / "ImageNet_1K" / "0.jpg").write_bytes(b"edited")  # already unpacked: left alone
    assert fetch.main(["--dataset", "mme5-hardneg", "--out", str(out), "--subset", "ImageNet_1K"]) == 0
    assert (out / "images" / "ImageNet_1K" / "0.jpg").read_bytes() == b"edited"
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(tmp_path / "whole")]) == 0
    assert calls[-1]["repo_id"] == "TIGER-Lab/MMEB-train" and calls[-1]["allow_patterns"] is None


def test_evaluation_sets_keep_their_zips(tmp_path, monkeypatch, capsys):
    files = {"README.md": b"# no front matter\n", "images.zip": zip_bytes({"a/0.jpg": b"x"})}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub([], files))
    assert fetch.main(["--dataset", "mmeb-eval", "--out", str(tmp_path / "eval")]) == 0
    assert not (tmp_path / "eval" / "a").exists()
    printed = capsys.readouterr().out
    assert "--benchmark mmeb --mmeb" in printed and "not stated in the dataset card" in printed


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_an_archive_member_escaping_the_folder_is_refused(tmp_path, kind):
    members = {"ok.jpg": b"1", "../../escaped.jpg": b"2"}
    archive = tmp_path / "sub" / ("bad.zip" if kind == "zip" else "bad.tar.gz")
    archive.parent.mkdir()
    archive.write_bytes(zip_bytes(members) if kind == "zip" else tar_bytes(members))
    with pytest.raises(ValueError, match=r"'\.\./\.\./escaped\.jpg' would be written outside"):
        fetch.unpack(archive)
    assert not (tmp_path.parent / "escaped.jpg").exists()
    assert not archive.with_name(archive.name + ".unpacked").exists()


@pytest.mark.parametrize(("name", "spoil"), [
    ("cut.tar.gz", lambda data: data[: len(data) - 40]),  # a download cut short
    ("bad.tar.gz", lambda data: data[:60] + bytes(30) + data[90:]),  # its size, its content damaged
    ("noise.tar", lambda data: b"not an archive" * 40),
    ("cut.zip", lambda data: data[: len(data) // 2]),
])
def test_a_damaged_archive_is_refused_naming_it_and_the_way_out(tmp_path, name, spoil):
    members = {f"{i}.jpg": bytes(range(256)) * 40 for i in range(3)}
    archive = tmp_path / name
    archive.write_bytes(spoil(zip_bytes(members) if name.endswith(".zip") else tar_bytes(members)))
    with pytest.raises(ValueError, match=rf"{name}: a damaged or cut archive \(\w+: .*\); delete its "
                                         r"file\(s\) and rerun to download them again"):
        fetch.unpack(archive)
    assert not archive.with_name(archive.name + ".unpacked").exists()  # a rerun unpacks it again


def test_an_archive_the_hub_replaced_is_unpacked_again_and_a_copied_one_is_not(tmp_path):
    archive = tmp_path / "A.tar.gz"
    archive.write_bytes(tar_bytes({"0.jpg": b"old"}))
    assert fetch.unpack(archive) and not fetch.unpack(archive)
    archive.write_bytes(tar_bytes({"0.jpg": b"new", "1.jpg": b"added"}))  # a rerun downloaded a newer one
    with pytest.warns(UserWarning, match="A.tar.gz: the hub replaced this archive since it was unpacked"):
        assert fetch.unpack(archive)
    assert (tmp_path / "0.jpg").read_bytes() == b"new" and (tmp_path / "1.jpg").read_bytes() == b"added"
    os.utime(archive, (0, 0))  # as a copy of the folder to another machine leaves it
    assert not fetch.unpack(archive)
    archive.with_name("A.tar.gz.unpacked").write_text("unpacked\n")  # an earlier version's marker: trusted
    assert not fetch.unpack(archive)


@pytest.mark.parametrize(("dataset", "option", "message"), [
    ("mmeb-v2", ["--subset", "MSR-VTT"], "MMEB-V2 is fetched by --modalities"),
    ("mmeb-train", ["--modalities", "video"], "--modalities narrows MMEB-V2 only; narrow mmeb-train with "
                                              "--subset"),
])
def test_an_option_the_data_set_cannot_narrow_by_is_refused_not_ignored(tmp_path, capsys, dataset, option,
                                                                        message):
    with pytest.raises(SystemExit) as stop:  # ignored, it would fetch the whole data set
        fetch.main(["--dataset", dataset, "--out", str(tmp_path / "out"), *option])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_offline_it_stops_at_once_and_says_how_to_bring_the_files(tmp_path, monkeypatch, capsys):
    go_offline(monkeypatch)
    assert fetch.main(["--dataset", "mme5-synthetic", "--out", str(tmp_path / "syn")]) == 2
    error = capsys.readouterr().err
    assert "intfloat/mmE5-synthetic: the Hugging Face Hub cannot be reached" in error
    assert "copy" in error and "rerun" in error


TRAIN_FILES = {"README.md": CARD, "A/train.parquet": b"PAR1" * 10, "B/train.parquet": b"PAR1" * 20,
               "images/A.zip": zip_bytes({"A/0.jpg": b"jpeg-0"})}


def test_offline_success_only_for_a_request_completed_before_and_still_whole(tmp_path, monkeypatch, capsys):
    """Case 10: offline into a non-empty folder said success (huggingface_hub returns it as it is). Now: a
    fetch stopped half-way, a request never completed, or a complete one with a file since lost is an
    error; a request completed before, with its files all there, succeeds saying it was not checked."""
    out = tmp_path / "raw"
    real = huggingface_hub.snapshot_download
    cut = fake_hub([], TRAIN_FILES, short={"A/train.parquet"})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cut)
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "A"]) == 2  # cut short
    assert "1 file(s) missing or short: A/train.parquet" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real)
    go_offline(monkeypatch)
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "A"]) == 2
    assert "cannot be reached" in capsys.readouterr().err  # a non-empty folder, but not complete

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub([], TRAIN_FILES))
    (out / "A" / "train.parquet").unlink()
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "A"]) == 0
    record = json.loads((out / ".mme5-owner.json").read_text())
    assert record["complete"] and record["subsets"] == ["A"] and record["files"]["A/train.parquet"] == 40
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real)
    capsys.readouterr()
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "A"]) == 0
    assert "not checked for a newer revision" in capsys.readouterr().err
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "B"]) == 2  # never fetched
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out)]) == 2  # the whole set: neither
    (out / "images" / "A.zip.unpacked").unlink()
    (out / "images" / "A" / "0.jpg").unlink()
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "A"]) == 0
    assert (out / "images" / "A" / "0.jpg").read_bytes() == b"jpeg-0"  # unpacking needs no hub
    (out / "A" / "train.parquet").write_bytes(b"PAR1")  # cut: 4 of 40 bytes
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "A"]) == 2


def test_subsets_accumulate_and_another_data_set_or_revision_is_refused(tmp_path, monkeypatch, capsys):
    out, calls = tmp_path / "raw", []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(calls, TRAIN_FILES))
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "A"]) == 0
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "B", "B"]) == 0
    assert json.loads((out / ".mme5-owner.json").read_text())["subsets"] == ["A", "B"]
    assert calls[-1]["allow_patterns"] == ["*B*", "README.md"]  # a repeated subset is asked once
    capsys.readouterr()
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "Imagenet"]) == 2
    assert "--subset Imagenet names no file" in capsys.readouterr().err and len(calls) == 2
    for other in (["--dataset", "mme5-hardneg"], ["--dataset", "mmeb-train", "--revision", "v2"]):
        assert fetch.main([*other, "--out", str(out)]) == 2
        assert "--overwrite" in capsys.readouterr().err
    assert fetch.main(["--dataset", "mme5-hardneg", "--out", str(out), "--subset", "B", "--overwrite"]) == 0
    record = json.loads((out / ".mme5-owner.json").read_text())
    assert record["identity"]["dataset"] == "intfloat/mmE5-MMEB-hardneg" and record["subsets"] == ["B"]
    assert not (out / "A").exists()  # the old output was replaced as a whole


def test_a_folder_fetched_before_owner_records_is_resumed_not_downloaded_again(tmp_path, monkeypatch):
    out, calls = tmp_path / "raw", []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(calls, TRAIN_FILES))
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "A"]) == 0
    (out / ".mme5-owner.json").unlink()  # as an earlier version of fetch left it
    (out / ".cache" / "huggingface").mkdir(parents=True)  # the hub client's local-dir cache
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "A"]) == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing fetched or unpacked again
    assert json.loads((out / ".mme5-owner.json").read_text())["adopted"]
    (out / ".mme5-owner.json").unlink()
    (out / ".cache" / "huggingface").rmdir()  # a folder of other files: refused, not written into
    assert fetch.main(["--dataset", "mmeb-train", "--out", str(out), "--subset", "A"]) == 2
