"""Batch mode end to end: the real pipeline against a fake Batch API (files + batches) on 127.0.0.1, and a
script standing in for `vllm run-batch`."""

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from chat_server import BatchServer, Failure
from doc_blocks import doc_commands
from test_synthesis_images import FakeEmbed
from test_synthesis_pipeline import ANSWER, KEY_ENV, assert_no_key, failed_lines, settings, written_ids

from mme5.data.shards import read_samples, sample_to_record, shard_urls
from mme5.synthesis.__main__ import main as cli_main
from mme5.synthesis.pipeline import run

BATCH = {"mode": "batch", "batch_poll_s": 0.0, "batch_max_requests": 10}


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-DO-NOT-LEAK-5e2b7d10")


class AnswerBatchServer(BatchServer):
    """Answers with a valid sample; `contents` scripts answer texts first (in the order answered)."""

    def __init__(self, contents=(), **kwargs):
        super().__init__(content=ANSWER, **kwargs)
        self.contents = list(contents)

    def _completion(self, request):  # called under the server's lock
        self.content = self.contents.pop(0) if self.contents else ANSWER
        return super()._completion(request)


def batch_settings(tmp_path, server, **client):
    config = settings(tmp_path, server)
    config.client |= BATCH | client
    return config


def submitted_ids(server: BatchServer) -> list[str]:
    return [sample_id for _, ids in server.created for sample_id in ids]


def shard_records(out: Path) -> list[dict]:
    return [sample_to_record(s) for s in read_samples(shard_urls(out), strict=True)]


def test_batch_mode_writes_every_planned_id_once_and_retries_exactly_the_failed(tmp_path):
    plan_ids = [f"syn-3-{i}" for i in range(24)]
    with AnswerBatchServer(contents=["{not json"], request_errors={"syn-3-5"}) as server:
        config = batch_settings(tmp_path, server)
        summary = run(config, embed=FakeEmbed())
    out = Path(config.out)
    # 24 requests in files of at most 10; the invalid answer (the first answered) goes into a 4th batch
    assert [len(ids) for _, ids in server.created] == [10, 10, 4, 1]
    assert sorted(submitted_ids(server)[:24]) == sorted(plan_ids)
    retried = server.created[3][1][0]
    assert retried == "syn-3-0" and Counter(submitted_ids(server))[retried] == 2
    assert (summary["written"], summary["failed"], summary["failed_by_reason"]) == \
        (23, 1, {"chat_http_400": 1})
    assert summary["this_run"]["batches"] == 4 and summary["batches"] == 4
    assert server.listings == 0  # the account's files and batches are read only to re-attach after a kill
    # cost at the batch price: half of 2.5 $/M input and 10 $/M output, over the 24 answered requests
    assert summary["this_run"]["calls"] == 24 == summary["total"]["calls"]
    assert summary["total"]["cost_usd"] == round(24 * (120 * 2.5 + 30 * 10.0) / 1e6 * 0.5, 6)
    assert sorted(written_ids(out)) == sorted(set(plan_ids) - {"syn-3-5"})
    # the same request as online: the schema, the images as data URLs, the plan id as custom_id
    uploaded = json.loads(next(iter(server.files.values()))["content"].splitlines()[0])
    assert uploaded["custom_id"] == "syn-3-0" and uploaded["url"] == "/v1/chat/completions"
    assert uploaded["body"]["response_format"]["json_schema"]["strict"] is True
    assert all(f["purpose"] == "batch" for f in server.files.values() if f["filename"].startswith("mme5-"))
    assert not list((out / "batches").glob("*.jsonl"))  # the large files go once committed
    assert_no_key(out)

    # --retry-failed resubmits exactly the failed id
    with AnswerBatchServer() as server:
        config = batch_settings(tmp_path, server)
        config.retry_failed = True
        summary = run(config, embed=FakeEmbed())
    assert submitted_ids(server) == ["syn-3-5"] and summary["written"] == 24 and summary["failed"] == 0


def test_an_expired_batch_is_resubmitted_for_its_unanswered_ids_only(tmp_path):
    with AnswerBatchServer(outcomes=["expired"], expired_answers=4) as server:
        config = batch_settings(tmp_path, server, batch_max_requests=24)
        summary = run(config, embed=FakeEmbed())
    first, second = server.created[0][1], server.created[1][1]
    assert len(first) == 24 and second == first[4:] and len(server.created) == 2
    assert summary["written"] == 24 and summary["this_run"]["calls"] == 24
    assert sorted(written_ids(Path(config.out))) == sorted(first)
    rows = [json.loads(line) for line in (Path(config.out) / "batches.jsonl").read_text().splitlines()]
    states = [row["state"] for row in rows if row["name"] == "batch-00000"]
    assert states[0] == "written" and states[-3:] == ["ended", "downloaded", "committed"]
    assert "in_progress" in [row.get("status") for row in rows]  # each status change is recorded


def test_a_failed_batch_resubmits_then_fails_its_ids(tmp_path):
    with AnswerBatchServer(outcomes=["failed"] * 3) as server:
        config = settings(tmp_path, server, num_samples=3, answer_retries=2)
        config.client |= BATCH
        summary = run(config, embed=FakeEmbed())
    assert [len(ids) for _, ids in server.created] == [3, 3, 3]
    assert summary["failed_by_reason"] == {"batch_failed": 3} and summary["this_run"]["calls"] == 0


KILLED_BATCH_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_synthesis_images import FakeEmbed
import mme5.synthesis.batch as batch
from mme5.synthesis.config import SynthesisConfig
from mme5.synthesis.pipeline import run

point, calls = {point!r}, []

def killing(original, at):
    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) == at and point == "poll":  # while batches are in flight
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return call

# after the 2nd upload, the 2nd create, the 2nd download and the 13th commit returned; before the 3rd poll
owner, name, at = {{"upload": ("BatchAPI", "upload", 2), "create": ("BatchAPI", "create", 2),
                   "poll": ("BatchAPI", "status", 3), "download": ("BatchAPI", "download", 2),
                   "commit": (None, "commit_answer", 13)}}[point]
owner = getattr(batch, owner) if owner else batch
setattr(owner, name, killing(getattr(owner, name), at))
run(SynthesisConfig(**{values!r}), embed=FakeEmbed())
"""


# ~14 s each (a subprocess importing torch, two runs): the create point (the step that is paid for) in the
# quick suite, the other four marked slow
@pytest.mark.parametrize("point", [pytest.param(p, marks=pytest.mark.slow) if p != "create" else p
                                   for p in ("upload", "create", "poll", "download", "commit")])
def test_kill_9_at_each_remote_step_resumes_by_reattaching(tmp_path, point):
    with AnswerBatchServer() as server:  # the uninterrupted run
        reference = batch_settings(tmp_path / "reference", server)
        run(reference, embed=FakeEmbed())
    with AnswerBatchServer() as server:
        config = batch_settings(tmp_path, server)
        code = KILLED_BATCH_RUN.format(tests=str(Path(__file__).parent), values=vars(config), point=point)
        child = subprocess.run([sys.executable, "-c", code], env=os.environ | {"PYTHONPATH": os.getcwd()})
        assert child.returncode == -signal.SIGKILL
        created_before = len(server.created)
        with pytest.warns(UserWarning, match="took over the lock"):
            summary = run(config, embed=FakeEmbed())
    assert summary["written"] == 24 and summary["failed"] == 0
    ids = submitted_ids(server)
    assert len(ids) == len(set(ids)) == 24  # no planned id submitted twice, whatever the kill
    assert len([name for name, _ in server.uploads if name.startswith("mme5-")]) == 3  # nor uploaded twice
    assert len(server.created) == 3 and created_before >= (0 if point in ("upload", "create") else 3)
    assert shard_records(Path(config.out)) == shard_records(Path(reference.out))
    # every batch was paid once: the answered requests are the planned ones
    assert summary["total"]["calls"] == 24 and len(server.requests) == 24


LOCAL_BATCH = """
import json, sys
answer = {answer!r}
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
with open(args["-i"]) as requests, open(args["-o"], "w") as out:
    for n, line in enumerate(requests):
        request = json.loads(line)
        body = {{"id": f"cmpl-{{n}}", "object": "chat.completion", "model": request["body"]["model"],
                "choices": [{{"index": 0, "message": {{"role": "assistant", "content": answer}}}}],
                "usage": {{"prompt_tokens": 100, "completion_tokens": 20}}}}
        response = {{"status_code": 200, "request_id": f"r{{n}}", "body": body}}
        out.write(json.dumps({{"id": f"r{{n}}", "custom_id": request["custom_id"], "error": None,
                              "response": response}}) + "\\n")
"""


def test_local_batch_command_stands_in_for_the_api(tmp_path):
    script = tmp_path / "run_batch.py"
    script.write_text(LOCAL_BATCH.format(answer=ANSWER))
    with AnswerBatchServer() as server:
        command = f"{sys.executable} {script} -i {{input}} -o {{output}} --model test-mllm"
        config = batch_settings(tmp_path, server, local_batch_command=command)
        summary = run(config, embed=FakeEmbed())
    assert not server.created and not server.files  # nothing went to the API
    assert summary["written"] == 24 and summary["this_run"]["batches"] == 3
    assert summary["total"]["input_tokens"] == 24 * 100
    assert len(written_ids(Path(config.out))) == 24

    config.client["local_batch_command"] = f"{sys.executable} -c 'exit(3)' {{input}} {{output}}"
    config.num_samples = 30  # (another plan: a fresh folder)
    config.out = str(tmp_path / "broken")
    summary = run(config, embed=FakeEmbed())
    assert "exited with status 3" in summary["stopped"] and failed_lines(Path(config.out)) == []


def test_refused_credentials_stop_a_batch_run_without_failing_any_id(tmp_path):
    with AnswerBatchServer() as server:
        server.script.extend([Failure(401)] * 5)
        config = batch_settings(tmp_path, server)
        summary = run(config, embed=FakeEmbed())
        assert "authentication refused" in summary["stopped"] and failed_lines(Path(config.out)) == []
        assert not server.created
        server.script.clear()
        assert run(config, embed=FakeEmbed())["written"] == 24  # the same command resumes
        assert len(submitted_ids(server)) == 24


def test_dry_run_prints_online_and_batch_cost_side_by_side(tmp_path, capsys):
    config_file = tmp_path / "synthesis.yaml"
    config_file.write_text(Path("configs/synthesis/default.yaml").read_text())
    assert cli_main(["--config", str(config_file), "--dry-run", "--num-samples", "50", "--mode", "batch",
                     "--out", str(tmp_path / "out")]) == 0
    estimate = json.loads(capsys.readouterr().out)["estimate"]
    by_mode = estimate["cost_usd_by_mode"]
    assert by_mode["batch"] == pytest.approx(by_mode["online"] * 0.5, abs=1e-4) and by_mode["batch"] > 0
    assert estimate["cost_usd"] == by_mode["batch"]


def test_batch_settings_are_checked(tmp_path):
    from mme5.synthesis.config import SynthesisConfig

    with pytest.raises(ValueError, match="must contain {input} and {output}"):
        SynthesisConfig(out=str(tmp_path), client={"model": "m", "local_batch_command": "vllm run-batch"})
    with pytest.raises(ValueError, match="'online' or 'batch'"):
        SynthesisConfig(out=str(tmp_path), client={"model": "m", "mode": "offline"})


def test_docs_dry_run_figures(tmp_path, capsys):
    """The figures docs/synthesis.md quotes are what its --dry-run command prints."""
    [command] = doc_commands("docs/synthesis.md", "Cost: online or batch")
    assert cli_main(command.split()[3:] + ["--out", str(tmp_path / "out")]) == 0
    estimate = json.loads(capsys.readouterr().out)["estimate"]
    text = Path("docs/synthesis.md").read_text()
    by_mode = estimate["cost_usd_by_mode"]
    assert f"${by_mode['online']:.2f} online, ${by_mode['batch']:.2f} batch" in text
    tokens = f"{estimate['input_tokens'] / 1e6:.1f}M input and {estimate['output_tokens'] / 1e6:.1f}M output"
    assert tokens in text
