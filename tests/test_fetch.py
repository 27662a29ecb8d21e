"""Fetching the published sets: what is asked of the hub, unpacking once and safely, the next commands, and a
clear stop offline."""

import io
import tarfile
import zipfile

import huggingface_hub
import pytest

from mme5.data import fetch


def fake_hub(calls, files):
    """A snapshot_download that records its arguments and writes `files` (path → bytes) into local_dir."""

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        for path, data in files.items():
            target = kwargs["local_dir"] / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():  # as the hub client: what is there is not fetched again
                target.write_bytes(data)
        return str(kwargs["local_dir"])

    return snapshot_download


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
             "images/more.tar.gz": tar_bytes({"ImageNet_1K/1.jpg": b"jpeg-1"})}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(calls, files))
    out = tmp_path / "hardneg"
    assert fetch.main(["--dataset", "mme5-hardneg", "--out", str(out), "--subset", "ImageNet_1K"]) == 0
    assert calls == [{"repo_id": "intfloat/mmE5-MMEB-hardneg", "repo_type": "dataset", "local_dir": out,
                      "allow_patterns": ["*ImageNet_1K*", "README.md"], "revision": None, "token": None}]
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


def test_offline_it_stops_at_once_and_says_how_to_bring_the_files(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert fetch.main(["--dataset", "mme5-synthetic", "--out", str(tmp_path / "syn")]) == 2
    error = capsys.readouterr().err
    assert "intfloat/mmE5-synthetic: the Hugging Face Hub cannot be reached" in error
    assert "copy" in error and "rerun" in error
