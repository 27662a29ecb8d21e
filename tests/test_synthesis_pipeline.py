"""The synthesis pipeline end to end against a real scripted chat server on 127.0.0.1."""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from chat_server import ChatServer, Failure
from doc_blocks import doc_commands, run_doc_commands
from test_synthesis_images import FakeEmbed, make_images

from mme5.data.shards import read_manifest, read_samples, sample_to_record, shard_urls
from mme5.files import FolderHoldsOtherOutput
from mme5.synthesis.__main__ import main as cli_main
from mme5.synthesis.config import SynthesisConfig
from mme5.synthesis.pipeline import run
from mme5.synthesis.workdir import STAGING, commit_sample, read_staged

KEY = "sk-test-DO-NOT-LEAK-5e2b7d10"
KEY_ENV = "MME5_TEST_SYNTH_KEY"
SIDES = {"instruction": "Find the matching picture.", "query": "a small coloured square",
         "positive": "a square filled with one colour", "hard_negative": "a striped round plate"}
ANSWER = json.dumps({
    "interpretation": {"general_description": "a square", "object_details": "none", "context": "plain",
                       "task_brainstorm": "colour matching"},
    "draft": SIDES,
    "evaluation": {"relevance": 5, "plausibility": 4, "clarity": 5, "diversity": 3, "comments": "fine"},
    "improvements": "none",
    "revised": SIDES,
})


class AnswerServer(ChatServer):
    """Answers with a valid sample; `contents` scripts answer texts (e.g. garbled JSON) first."""

    def __init__(self, contents=(), **kwargs):
        super().__init__(content=ANSWER, **kwargs)
        self.contents = list(contents)

    def _completion(self, request):
        with self._lock:
            self.content = self.contents.pop(0) if self.contents else ANSWER
            return super()._completion(request)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def settings(tmp_path: Path, server: ChatServer, **overrides) -> SynthesisConfig:
    images = tmp_path / "imgs"
    if not images.exists():
        make_images(images, 20)
    values = dict(out=str(tmp_path / "out"), images=str(images), num_samples=24, seed=3, english_share=1.0,
                  positive_ranks=[1, 3], negative_ranks=[5, 10], shard_size=10, progress=False,
                  client=dict(model="test-mllm", base_url=server.base_url, api_key_env=KEY_ENV, timeout_s=5.0,
                              backoff_base_s=0.01, backoff_max_s=0.02, max_attempts=3, max_concurrency=4,
                              input_usd_per_million=2.5, output_usd_per_million=10.0))
    return SynthesisConfig(**(values | overrides))


def written_ids(out: Path) -> list[str]:
    return [s.id for s in read_samples(shard_urls(out), strict=True)]


def assert_no_key(out: Path):
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_happy_path_writes_shards_with_images_and_schema(tmp_path):
    with AnswerServer() as server:
        config = settings(tmp_path, server)
        summary = run(config, embed=FakeEmbed())
    out = Path(config.out)
    assert summary["planned"] == summary["written"] == 24 and summary["failed"] == 0
    assert summary["this_run"]["input_tokens"] == 24 * 120 and summary["this_run"]["cost_usd"] > 0
    assert summary["total"] == {key: summary["this_run"][key]
                                for key in ("calls", "input_tokens", "output_tokens", "cost_usd")}
    assert json.loads((out / "summary.json").read_text()) == summary
    manifest = read_manifest(out)
    assert manifest["complete"] and [s["count"] for s in manifest["shards"]] == [10, 10, 4]
    plan_ids = [json.loads(line)["id"] for line in (out / "plan.jsonl").read_text().splitlines()]
    samples = list(read_samples(shard_urls(out), strict=True))
    assert [s.id for s in samples] == plan_ids  # plan order
    assert not list((out / STAGING).iterdir())
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["id"] for a in answers) == sorted(plan_ids) and answers[0]["evaluation"]["relevance"] == 5
    n_images = Counter(len(r["messages"][1]["content"]) - 1 for r in server.requests)
    expected = Counter(sum(side.image is not None for _, side in s.sides) for s in samples)
    assert n_images == expected and set(n_images) <= {0, 1, 2, 3}
    for request in server.requests:
        assert request["response_format"]["json_schema"]["strict"] is True
        for part in request["messages"][1]["content"][1:]:
            assert base64.b64decode(part["image_url"]["url"].split(",", 1)[1])[:4] == b"\x89PNG"
    with_image = next(s for s in samples if s.query.image is not None)
    assert with_image.query.image in {p.read_bytes() for p in (tmp_path / "imgs").rglob("*.png")}
    assert_no_key(out)
    # rerun: nothing left to do, no request, same shards
    before = len(server.requests)
    with AnswerServer() as again:
        summary = run(settings(tmp_path, again), embed=FakeEmbed())
    assert summary["this_run"]["attempted"] == 0 and not again.requests and before == 24
    assert summary["this_run"]["calls"] == 0 and summary["total"]["calls"] == 24
    assert written_ids(out) == plan_ids


def test_faults_are_retried_or_recorded_with_reasons(tmp_path):
    faults = [Failure(status=429, headers={"Retry-After": "0"}), Failure(status=500), Failure(garbled=True)]
    # 3 garbled answers in a row exhaust one sample's answer retries; a 400 fails fast
    with AnswerServer(contents=["{not json", "{not json", "{not json"]) as server:
        server.script.extend(faults + [Failure(status=400)])
        config = settings(tmp_path, server, num_samples=12, use_response_format=False)
        config.client |= {"max_concurrency": 1, "max_attempts": 4}  # one sample meets the faults in turn
        summary = run(config, embed=FakeEmbed())
    assert summary["written"] + summary["failed"] == summary["planned"] == 12
    assert summary["failed_by_reason"] == {"not_json": 1, "chat_http_400": 1}
    failed = [json.loads(line) for line in (Path(config.out) / "failed.jsonl").read_text().splitlines()]
    assert {f["reason"] for f in failed} == {"not_json", "chat_http_400"}
    assert next(f for f in failed if f["reason"] == "not_json")["attempts"] == 3
    assert all("response_format" not in r for r in server.requests)
    assert "JSON" in server.requests[0]["messages"][1]["content"][0]["text"]
    assert_no_key(Path(config.out))


def test_failed_ids_are_skipped_on_resume_and_retried_on_request(tmp_path):
    # sequential, no answer retries: the first two samples get non-JSON answers and fail
    with AnswerServer(contents=["{not json", "{not json"]) as server:
        config = settings(tmp_path, server, num_samples=8, answer_retries=0)
        config.client |= {"max_concurrency": 1}
        summary = run(config, embed=FakeEmbed())
    out = Path(config.out)
    assert (summary["written"], summary["failed"], summary["failed_by_reason"]) == (6, 2, {"not_json": 2})
    assert summary["total"]["calls"] == 8 and summary["total"]["input_tokens"] == 8 * 120
    failed = [json.loads(line)["id"] for line in (out / "failed.jsonl").read_text().splitlines()]
    with open(out / "failed.jsonl", "ab") as f:  # a crash mid-append leaves a torn line
        f.write(b'{"id": "torn-')

    # a plain resume pays for nothing again: failed ids are skipped and still reported
    with AnswerServer() as server:
        summary = run(settings(tmp_path, server, num_samples=8), embed=FakeEmbed())
    assert not server.requests and summary["this_run"]["retried"] == 0
    assert (summary["written"], summary["failed"], summary["total"]["calls"]) == (6, 2, 8)

    # --retry-failed re-attempts exactly the failed ids: one succeeds now, one fails again
    with AnswerServer(contents=["{not json"]) as server:
        config = settings(tmp_path, server, num_samples=8, answer_retries=0)
        config.client |= {"max_concurrency": 1}
        config.retry_failed = True
        summary = run(config, embed=FakeEmbed())
    assert len(server.requests) == 2 and summary["this_run"]["attempted"] == 2
    assert summary["this_run"]["retried"] == 2 and summary["this_run"]["retried_written"] == 1
    assert (summary["written"], summary["failed"], summary["failed_by_reason"]) == (7, 1, {"not_json": 1})
    assert summary["written"] + summary["failed"] == summary["planned"] == 8
    assert summary["this_run"]["calls"] == 2 and summary["total"]["calls"] == 10
    assert summary["total"]["input_tokens"] == 10 * 120
    rows = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]  # torn line cut
    assert [row["id"] for row in rows] == failed + [failed[0]]  # append-only: the latest row per id counts
    ids = written_ids(out)
    assert len(ids) == len(set(ids)) == 7 and failed[1] in ids and failed[0] not in ids

    # the flag from the command line
    from mme5.synthesis.__main__ import load_config, parse_args
    config_file = tmp_path / "synthesis.yaml"
    config_file.write_text(Path("configs/synthesis/default.yaml").read_text())
    assert load_config(parse_args(["--config", str(config_file), "--retry-failed"])).retry_failed is True
    assert load_config(parse_args(["--config", str(config_file)])).retry_failed is False


@pytest.mark.parametrize("trouble", ["packer_error", "nothing_buffered"])
def test_packing_during_the_run_falls_back_to_the_final_pack(tmp_path, monkeypatch, caplog, trouble):
    import mme5.synthesis.workdir as workdir

    if trouble == "packer_error":  # the 15th shard write (in the packer thread) fails once
        writes, original = [], workdir.ShardWriter.write

        def flaky(self, sample, cursor=None):
            writes.append(sample.id)
            if len(writes) == 15:
                raise OSError("disk hiccup")
            return original(self, sample, cursor)

        monkeypatch.setattr(workdir.ShardWriter, "write", flaky)
    else:  # every sample read back from its staging tar instead of memory
        monkeypatch.setattr(workdir.Packer.__init__, "__defaults__", (0,))
    with AnswerServer() as server:
        config = settings(tmp_path, server)
        summary = run(config, embed=FakeEmbed())
    out = Path(config.out)
    assert summary["written"] == 24 and summary["total"]["calls"] == 24
    plan_ids = [json.loads(line)["id"] for line in (out / "plan.jsonl").read_text().splitlines()]
    assert written_ids(out) == plan_ids and read_manifest(out)["complete"]
    answers = [json.loads(line)["id"] for line in (out / "answers.jsonl").read_text().splitlines()]
    assert sorted(answers) == sorted(plan_ids)
    assert not list((out / STAGING).iterdir())
    assert ("the final pack takes over" in caplog.text) == (trouble == "packer_error")


def test_plan_of_other_settings_is_refused_before_any_call(tmp_path):
    with AnswerServer() as server:
        run(settings(tmp_path, server, num_samples=2), embed=FakeEmbed())
        with pytest.raises(FolderHoldsOtherOutput, match=r"num_samples: 2 \(recorded\) → 3 \(now\)"):
            run(settings(tmp_path, server, num_samples=3), embed=FakeEmbed())
        assert len(server.requests) == 2


KILLED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from test_synthesis_images import FakeEmbed
from mme5.synthesis.config import SynthesisConfig
from mme5.synthesis.pipeline import run
run(SynthesisConfig(**{values!r}), embed=FakeEmbed())
"""


def test_kill_9_and_resume_gives_no_duplicates(tmp_path):
    # 0.2 s an answer: the run lasts ~2 s, a wide window for the kill even on a loaded machine
    with AnswerServer(latency_s=0.2) as killed_server:
        config = settings(tmp_path, killed_server, num_samples=40)
        out = Path(config.out)
        code = KILLED_RUN.format(tests=str(Path(__file__).parent), values=vars(config))
        child = subprocess.Popen([sys.executable, "-c", code], env=os.environ | {"PYTHONPATH": os.getcwd()})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list((out / STAGING).glob("*.tar"))) < 8:
            assert child.poll() is None, "the run ended before it was killed"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        staged = {p.stem for p in (out / STAGING).glob("*.tar")}
        assert 8 <= len(staged) < 40
    # the resume talks to a server of its own: a request the killed child had already written to its socket
    # can reach the first server late, and must not be counted as the resume's
    with AnswerServer(latency_s=0.2) as server:
        with pytest.warns(UserWarning, match=rf"took over the lock of pid {child.pid} "):
            summary = run(settings(tmp_path, server, num_samples=40), embed=FakeEmbed())
    assert summary["written"] == 40 and summary["failed"] == 0
    assert summary["this_run"]["calls"] == len(server.requests) <= 40 - len(staged)
    # usage over both runs: the killed run's committed samples (one call each) plus this run's calls;
    # calls the kill cut off before their sample was committed are not counted (nothing was kept of them)
    total = summary["total"]
    sent = len(killed_server.requests) + len(server.requests)
    assert total["calls"] == summary["this_run"]["calls"] + len(staged) <= sent
    assert total["input_tokens"] == 120 * total["calls"] and total["output_tokens"] == 30 * total["calls"]
    assert total["cost_usd"] == round(total["calls"] * (120 * 2.5 + 30 * 10.0) / 1e6, 6)
    assert json.loads((out / "summary.json").read_text())["total"] == total
    ids = written_ids(out)
    assert len(ids) == len(set(ids)) == 40

    # killed after packing but before the staging files were removed: a packed id staged again
    sample = next(read_samples(shard_urls(out)))
    record = sample_to_record(sample)
    commit_sample(out / STAGING, record, sample.id, {"note": "stale"})
    assert read_staged(out / STAGING / f"{sample.id}.tar")[1] == {"note": "stale"}
    with AnswerServer() as server:
        summary = run(settings(tmp_path, server, num_samples=40), embed=FakeEmbed())
    ids = written_ids(out)
    assert len(ids) == len(set(ids)) == 40 and not server.requests
    assert not list((out / STAGING).iterdir())


def test_dry_run_prints_the_estimate_without_requests(tmp_path, capsys):
    with AnswerServer() as server:
        config_file = tmp_path / "synthesis.yaml"
        config_file.write_text(Path("configs/synthesis/default.yaml").read_text())
        code = cli_main(["--config", str(config_file), "--dry-run", "--num-samples", "30",
                         "--base-url", server.base_url, "--out", str(tmp_path / "out"), "--shard", "1",
                         "--num-shards", "3"])
    assert code == 0 and not server.requests and not (tmp_path / "out").exists()
    report = json.loads(capsys.readouterr().out)
    assert report["estimate"]["calls"] == 10 and sum(report["mix"]["task"].values()) == 10
    assert report["estimate"]["input_tokens"] > 10 * 500 and report["estimate"]["cost_usd"] > 0


def test_cli_job_array_part_writes_its_share(tmp_path):
    make_images(tmp_path / "imgs", 20)
    with AnswerServer() as server:
        config = settings(tmp_path, server)
        values = vars(config) | {"client": config.client | {"base_url": None}}
        config_file = tmp_path / "synthesis.yaml"
        config_file.write_text(json.dumps(values))  # JSON is YAML
        import mme5.synthesis.pipeline as pipeline

        original = pipeline.encoder_embedder
        pipeline.encoder_embedder = lambda path: (FakeEmbed(), "fake")
        try:
            code = cli_main(["--config", str(config_file), "--base-url", server.base_url, "--shard", "0",
                             "--num-shards", "2", "--concurrency", "2", "--embedder", str(tmp_path / "imgs")])
        finally:
            pipeline.encoder_embedder = original
    part = Path(config.out) / "part-00000-of-00002"
    assert code == 0 and len(written_ids(part)) == 12 and len(server.requests) == 12
    saved = json.loads((part / "config.json").read_text())
    assert saved["client"]["max_concurrency"] == 2 and saved["client"]["api_key_env"] == KEY_ENV
    assert_no_key(Path(config.out))


@pytest.mark.parametrize("where", ["client", "top"])
def test_a_key_in_the_config_is_refused_before_anything_is_written(tmp_path, capsys, where):
    out = tmp_path / "out"
    values = {"out": str(out), "client": {"model": "m"}}
    (values["client"] if where == "client" else values)["api_key"] = "sk-live-SECRET"
    config_file = tmp_path / "synthesis.yaml"
    config_file.write_text(json.dumps(values))
    assert cli_main(["--config", str(config_file)]) == 2
    error = capsys.readouterr().err
    assert re.search(r"\['api_key'\] look like credentials.*OPENAI_API_KEY", error), error
    assert "sk-live-SECRET" not in error and not out.exists()


@pytest.mark.parametrize("flag, value", [("--concurrency", "0"), ("--num-samples", "0"), ("--shard", "3")])
def test_numeric_settings_are_checked_when_parsed(tmp_path, capsys, flag, value):
    config_file = tmp_path / "synthesis.yaml"
    config_file.write_text(json.dumps({"out": str(tmp_path / "out"), "client": {"model": "m"}}))
    # not a run that hangs or writes nothing: a message and exit status 2
    assert cli_main(["--config", str(config_file), flag, value, "--num-shards", "2"]) == 2
    assert "must be" in capsys.readouterr().err and not (tmp_path / "out").exists()


def failed_lines(out: Path) -> list[str]:
    path = out / "failed.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_refused_credentials_stop_the_run_without_failing_any_id(tmp_path):
    """A 401 is the service's answer to every request: the run stops (exit 2), no id is marked failed, and
    a rerun with a working key writes everything."""
    with AnswerServer() as server:
        server.script.extend([Failure(401)] * 100)
        config = settings(tmp_path, server)
        summary = run(config, embed=FakeEmbed())
        assert "authentication refused" in summary["stopped"] and summary["written"] == 0
        assert failed_lines(Path(config.out)) == [] and len(server.requests) <= 4  # one wave at most
        server.script.clear()
        assert run(config, embed=FakeEmbed())["written"] == 24


def test_an_unreachable_server_is_detected_across_requests_not_per_sample(tmp_path):
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with AnswerServer() as server:
        config = settings(tmp_path, server)
    config.client |= {"base_url": f"http://127.0.0.1:{port}/v1", "max_attempts": 6, "backoff_base_s": 0.2,
                      "backoff_max_s": 1.0}
    started = time.monotonic()
    summary = run(config, embed=FakeEmbed())
    assert "unreachable" in summary["stopped"] and failed_lines(Path(config.out)) == []
    assert time.monotonic() - started < 20  # not 24 samples x 6 attempts of backoff


def test_a_disk_error_while_committing_stops_the_run_and_loses_nothing(tmp_path, monkeypatch):
    import mme5.synthesis.answers as answers

    commits = []

    def disk_fills_up(staging, record, sample_id, meta):
        if len(commits) == 5:
            raise OSError(28, "No space left on device")
        commits.append(sample_id)
        return commit_sample(staging, record, sample_id, meta)

    with AnswerServer() as server:
        config = settings(tmp_path, server, client=settings(tmp_path, server).client | {"max_concurrency": 1})
        with monkeypatch.context() as patch:
            patch.setattr(answers, "commit_sample", disk_fills_up)
            summary = run(config, embed=FakeEmbed())
        assert "No space left" in summary["stopped"] and failed_lines(Path(config.out)) == []
        assert sorted(written_ids(Path(config.out))) == sorted(commits)  # what was committed is kept
        assert run(config, embed=FakeEmbed())["written"] == 24


def test_exit_codes_say_stopped_and_nothing_written(tmp_path, monkeypatch):
    import mme5.synthesis.pipeline as pipeline

    monkeypatch.setattr(pipeline, "encoder_embedder", lambda path: (FakeEmbed(), "fake"))
    for name, failures, contents, expected in (("stopped", [Failure(403)] * 50, [], 2),
                                               ("nothing", [], ["{not json"] * 50, 1)):
        with AnswerServer(contents=contents) as server:
            server.script.extend(failures)
            config = settings(tmp_path / name, server, answer_retries=0, num_samples=4)
            values = vars(config) | {"embedder": str(tmp_path)}  # an existing path: the model is patched
            (tmp_path / f"{name}.yaml").write_text(json.dumps(values))
            assert cli_main(["--config", str(tmp_path / f"{name}.yaml")]) == expected


def test_the_documented_commands_run_against_a_mock_server(tmp_path, tiny_mllama):
    """docs/synthesis.md's commands as written, the mock server standing in for both endpoints: OpenAI's
    through `OPENAI_BASE_URL`, as a user points the openai package elsewhere, and a local server through
    `--base-url`; 8 samples a run instead of 100000, a tiny backbone as the retrieval model."""
    images = make_images(tmp_path / "images", 60)  # the default config draws negatives at ranks 10..50
    real_runs = {"--num-samples 100000 --out": "--num-samples 8 --out", "IMAGE_DIR": str(images),
                 "ENCODER_DIR": tiny_mllama, "OPENAI_API_KEY=...": f"OPENAI_API_KEY={KEY}", "MODEL": "served"}
    commands = doc_commands("docs/synthesis.md", "Synthesis")
    for old, new in real_runs.items():
        commands = [command.replace(old, new) for command in commands]
    with AnswerServer() as server:
        commands = [c.replace("http://localhost:8000/v1", server.base_url) for c in commands]
        environment = os.environ | {"OPENAI_BASE_URL": server.base_url}
        dry_run, *_ = run_doc_commands(commands, tmp_path, env=environment)
    assert json.loads(dry_run)["estimate"]["calls"] == 100000
    assert {request["model"] for request in server.requests} == {"gpt-4o", "served"}
    assert {headers["authorization"] for headers in server.headers} == {f"Bearer {KEY}"}
    for out in ("runs/synthesis", "runs/synthesis-local"):
        summary = json.loads((tmp_path / out / "summary.json").read_text())
        assert summary["written"] + summary["failed"] == 8 and summary["written"] > 0
