"""Who owns a synthesis output folder: a run's --out, or one job-array part (mme5.synthesis.owner)."""

import json
import shutil
from pathlib import Path

import pytest
from test_synthesis_images import FakeEmbed, make_images
from test_synthesis_pipeline import KEY, KEY_ENV, AnswerServer, settings, written_ids

from mme5.files import OWNER_RECORD, FolderHoldsOtherOutput, FolderInUse, OutputFolderError, read_owner
from mme5.synthesis.__main__ import main as cli_main
from mme5.synthesis.owner import claim_output
from mme5.synthesis.pipeline import run


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def answer_models(folder: Path) -> list[str]:
    return [json.loads(line)["model"] for line in (folder / "answers.jsonl").read_text().splitlines()]


def test_another_model_is_refused_unless_asked_for_and_every_row_names_its_model(tmp_path):
    with AnswerServer(contents=["{not json"]) as server:
        first = settings(tmp_path, server, num_samples=6, answer_retries=0)
        first.client |= {"max_concurrency": 1}
        run(first, embed=FakeEmbed())
        out = Path(first.out)
        calls = len(server.requests)
        other = settings(tmp_path, server, num_samples=6, retry_failed=True)
        other.client |= {"model": "other-mllm"}
        with pytest.raises(FolderHoldsOtherOutput, match=r'model: "test-mllm" \(recorded\) → "other-mllm" '
                                                         r"\(now\).*--allow-model-change"):
            run(other, embed=FakeEmbed())
        assert len(server.requests) == calls  # refused before any call

        summary = run(other, embed=FakeEmbed(), allow_model_change=True)  # retries the failed id
        assert len(server.requests) == calls + 1 and summary["written"] == 6
    assert summary["written_by_model"] == {"test-mllm": 5, "other-mllm": 1}
    assert (summary["this_run"]["model"], summary["this_run"]["folder_model"]) == ("other-mllm", "test-mllm")
    assert sorted(answer_models(out)) == ["other-mllm"] + ["test-mllm"] * 5
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert [row["model"] for row in failed] == ["test-mllm"]
    record = read_owner(out)
    assert record["identity"]["model"] == "test-mllm"  # the folder's model; the rows say who wrote what
    assert record["complete"] and record["written_by_model"] == summary["written_by_model"]
    with pytest.raises(FolderHoldsOtherOutput, match="model"):  # each run with the other model says so
        run(other, embed=FakeEmbed())


def test_a_job_array_resubmitted_with_another_number_of_parts_is_refused(tmp_path):
    with AnswerServer() as server:
        for index in range(2):  # a complete 2-part array
            run(settings(tmp_path, server, num_samples=8, num_shards=2, shard_index=index), embed=FakeEmbed())
        out = Path(settings(tmp_path, server).out)
        calls = len(server.requests)
        assert calls == 8
        for num_shards, index in ((3, 0), (3, 2), (1, 0)):  # a new part, another new part, a single run
            with pytest.raises(FolderHoldsOtherOutput, match=r"part-00000-of-00002 holds synthesis output of "
                                                             rf"other settings.*num_shards: 2 \(recorded\) → "
                                                             rf"{num_shards} \(now\)"):
                run(settings(tmp_path, server, num_samples=8, num_shards=num_shards, shard_index=index),
                    embed=FakeEmbed())
        assert len(server.requests) == calls
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
            "cache", "part-00000-of-00002", "part-00001-of-00002", "plan.jsonl"]
        # the same array again resumes: nothing to do
        again = settings(tmp_path, server, num_samples=8, num_shards=2, shard_index=1)
        summary = run(again, embed=FakeEmbed())
        assert summary["this_run"]["attempted"] == 0 and len(server.requests) == calls

        # a part folder written before owner records: its name still says how many parts there were
        (out / "part-00000-of-00002" / OWNER_RECORD).unlink()
        with pytest.raises(FolderHoldsOtherOutput, match=r"num_shards: 2 \(recorded\) → 4"):
            run(settings(tmp_path, server, num_samples=8, num_shards=4, shard_index=3), embed=FakeEmbed())

        # an array into the --out of a single run
        single = settings(tmp_path / "single", server, num_samples=4)
        run(single, embed=FakeEmbed())
        with pytest.raises(FolderHoldsOtherOutput, match=r"single/out holds.*num_shards: 1 \(recorded\) → 2"):
            run(settings(tmp_path / "single", server, num_samples=4, num_shards=2), embed=FakeEmbed())


def test_parts_of_one_array_hold_their_own_locks(tmp_path):
    with AnswerServer() as server:
        parts = [settings(tmp_path, server, num_samples=8, num_shards=2, shard_index=i) for i in range(2)]
    identity = parts[0].output_identity("pool", "embedder")
    with claim_output(parts[0], identity) as first, claim_output(parts[1], identity) as second:
        assert first.work.name == "part-00000-of-00002" and second.work.name == "part-00001-of-00002"
        with pytest.raises(FolderInUse, match=r"part-00000-of-00002 is being written by pid \d+"):
            claim_output(parts[0], identity)  # the same part twice at once
    with pytest.raises(OutputFolderError, match="--overwrite replaces one folder.*remove"):
        claim_output(parts[0], identity, overwrite=True)
    shutil.rmtree(tmp_path / "out")
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputFolderError, match="out is a file"):
        claim_output(parts[0], identity)


def test_other_images_are_refused_and_overwrite_starts_afresh(tmp_path):
    with AnswerServer() as server:
        config = settings(tmp_path, server, num_samples=4)
        run(config, embed=FakeEmbed())
        make_images(tmp_path / "imgs" / "more", 2)  # the pool grew
        with pytest.raises(FolderHoldsOtherOutput, match="images: "):
            run(config, embed=FakeEmbed())
        summary = run(settings(tmp_path, server, num_samples=5), embed=FakeEmbed(), overwrite=True)
    assert summary["written"] == 5 and summary["this_run"]["attempted"] == 5
    out = Path(config.out)
    assert len(written_ids(out)) == 5 and read_owner(out)["identity"]["num_samples"] == 5


def test_a_folder_written_before_owner_records_is_resumed_when_its_settings_match(tmp_path):
    with AnswerServer() as server:
        config = settings(tmp_path, server, num_samples=4)
        run(config, embed=FakeEmbed())
        out = Path(config.out)
        (out / OWNER_RECORD).unlink()  # as an earlier version left it
        with pytest.raises(FolderHoldsOtherOutput, match="no mme5 command recorded"):
            run(settings(tmp_path, server, num_samples=4, seed=5), embed=FakeEmbed())
        summary = run(settings(tmp_path, server, num_samples=4), embed=FakeEmbed())
        assert summary["this_run"]["attempted"] == 0 and len(server.requests) == 4
    assert read_owner(out)["identity"]["seed"] == 3


def test_an_out_that_holds_the_images_is_refused(tmp_path):
    with AnswerServer() as server:
        config = settings(tmp_path, server, num_samples=4)
        config.out = str(tmp_path)  # the image folder is inside it
        with pytest.raises(OutputFolderError, match="holds the input"):
            run(config, embed=FakeEmbed(), overwrite=True)
    assert (tmp_path / "imgs").is_dir() and not server.requests


def test_a_run_that_fails_before_its_first_call_leaves_no_folder_that_refuses_the_corrected_one(
        tmp_path, monkeypatch):
    import mme5.synthesis.pipeline as pipeline

    def not_a_model(path):
        raise ValueError(f"{path}: not a model folder")

    monkeypatch.setattr(pipeline, "encoder_embedder", not_a_model)
    with AnswerServer() as server:
        wrong = settings(tmp_path, server, num_samples=4, embedder=str(tmp_path / "imgs"))
        with pytest.raises(ValueError, match="not a model folder"):
            run(wrong)
        out = Path(wrong.out)
        assert not list(out.iterdir()) and not server.requests
        assert run(settings(tmp_path, server, num_samples=4), embed=FakeEmbed())["written"] == 4


def test_cli_refusal_is_a_message_and_the_flags_reach_the_run(tmp_path, monkeypatch, capsys):
    import mme5.synthesis.pipeline as pipeline

    monkeypatch.setattr(pipeline, "encoder_embedder", lambda path: (FakeEmbed(), "fake"))
    with AnswerServer() as server:
        config = settings(tmp_path, server, num_samples=3, embedder=str(tmp_path / "imgs"))
        config_file = tmp_path / "synthesis.yaml"
        config_file.write_text(json.dumps(vars(config)))
        assert cli_main(["--config", str(config_file)]) == 0
        capsys.readouterr()
        assert cli_main(["--config", str(config_file), "--model", "other", "--seed", "4"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and "Traceback" not in error
        assert 'model: "test-mllm" (recorded) → "other" (now)' in error and "seed: 3 (recorded) → 4" in error
        assert cli_main(["--config", str(config_file), "--model", "other", "--allow-model-change"]) == 0
        assert cli_main(["--config", str(config_file), "--seed", "4", "--overwrite"]) == 0
    assert read_owner(Path(config.out))["identity"]["seed"] == 4 and len(server.requests) == 6
