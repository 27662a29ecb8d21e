"""The project's sbatch scripts on a real two-node SLURM cluster (slurm/local/cluster.py): training across
both nodes, preemption by the warning signal and by a plain requeue, evaluation under torchrun, and a
synthesis job array with a requeued task. Everything goes through `sbatch` of the real scripts; the only
overrides are the resources a 2-core machine has (docs/slurm.md).

Skipped with the reason when the cluster cannot start (not root, no apt).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mme5.backbones.tiny import build_tiny
from mme5.demo.world import WorldConfig, build_world

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "slurm" / "local"))
import cluster as local_cluster  # noqa: E402

pytestmark = pytest.mark.slurm
# The resources the local cluster's 2-core nodes have, as each script's usage header writes them.
LOCAL = {"train.sbatch": "--nodes 2 --ntasks-per-node 1 --gpus-per-node 1 --cpus-per-task 1 --mem 3G",
         "eval.sbatch": "--gpus-per-node 2 --cpus-per-task 1 --mem 3G",
         "synthesize.sbatch": "--array 0-3 --cpus-per-task 1 --mem 2G"}
STEPS = 12
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    try:
        conf = local_cluster.start(folder)
    except local_cluster.ClusterError as error:
        pytest.skip(f"no local SLURM cluster: {error}")
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the jobs' python is this one
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": path, "OMP_NUM_THREADS": "1"}
    yield env
    local_cluster.stop(folder)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small demo world, a tiny backbone and a CPU training recipe for 2 ranks."""
    root = tmp_path_factory.mktemp("inputs")
    world = WorldConfig(train_samples=160, eval_queries=4, eval_candidates=6, xtd_images=8,
                        languages=("en", "es"))
    build_world(root / "world", world, progress=False)
    backbone = build_tiny("qwen2_vl", root / "backbone", seed=0, preset="test")  # the demo world has clips
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""seed_everything: 0
trainer:
  accelerator: cpu
  strategy: ddp
  devices: 1
  precision: 32-true
  max_steps: {STEPS}
  log_every_n_steps: 1
  default_root_dir: {root}/run
  enable_model_summary: false
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: "${{trainer.default_root_dir}}", name: tensorboard, version: ""}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: ${{trainer.default_root_dir}}/checkpoints
        save_last: true
        enable_version_counter: false
        every_n_train_steps: 4
        save_top_k: -1
model:
  backbone: {backbone}
  lora: {{r: 2, alpha: 4, dropout: 0.1}}
  gradient_checkpointing: false
  chunk_size: 4
  lr: 1.0e-3
  warmup: 2
data:
  sources: [{{path: {root}/world/train}}]
  batch_size: 4
  num_negatives: 1
  num_workers: 0
  shuffle_buffer: 1  # resume is exact when no sample waits in a shuffle buffer (mme5.data.stream)
""")
    return root, recipe


def sbatch(env, script, options, args=(), extra_env=None) -> str:
    command = ["sbatch", "--parsable", "--chdir", str(ROOT), *options, str(ROOT / "slurm" / script), *args]
    exports = ",".join(["ALL", *(f"{k}={v}" for k, v in (extra_env or {}).items())])
    result = subprocess.run([*command[:2], f"--export={exports}", *command[2:]], env=env, capture_output=True,
                            text=True, check=True)
    return result.stdout.strip().split(";")[0]


def job(env, job_id) -> dict[str, str]:
    """`scontrol show job` as a dict (one per array task when the id is an array)."""
    command = ["scontrol", "show", "job", "-o", job_id]
    out = subprocess.run(command, env=env, capture_output=True, text=True).stdout
    fields = {}
    for token in out.split("\n")[0].split():
        key, _, value = token.partition("=")
        fields[key] = value
    return fields


def wait_done(env, job_id, timeout=240.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job(env, job_id)
        if fields.get("JobState") in FINAL_STATES:
            return fields
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not done after {timeout:.0f} s: {job(env, job_id)}")


def wait_for(path_glob: Path, timeout=180.0) -> None:
    deadline = time.monotonic() + timeout
    while not list(path_glob.parent.glob(path_glob.name)):
        assert time.monotonic() < deadline, f"no {path_glob} after {timeout:.0f} s"
        time.sleep(0.2)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def losses(run: Path) -> list[int]:
    """Steps of every train/loss value logged, over all event files of the run."""
    steps = []
    for events_file in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        events = EventAccumulator(str(events_file))
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            steps += [e.step for e in events.Scalars("train/loss")]
    return steps


def test_training_spans_two_nodes_and_resumes_exactly_after_preemption(slurm, inputs):
    """Three runs of the real train.sbatch on 2 nodes × 1 rank: uninterrupted; preempted by SLURM's warning
    signal (USR1) after its first periodic checkpoint; requeued without a signal (a node failure). Both
    interrupted runs resume by themselves (SLURM_RESTART_COUNT=1) and end with the uninterrupted run's
    weights."""
    root, recipe = inputs
    options = LOCAL["train.sbatch"].split()
    runs = {name: root / name for name in ("straight", "signalled", "requeued")}
    jobs = {name: sbatch(slurm, "train.sbatch", ["--job-name", f"mme5-{name}", "--output", f"{run}.log",
                                                 *options], ["--trainer.default_root_dir", str(run)],
                         {"CONFIG": recipe})
            for name, run in runs.items()}
    start = time.monotonic()
    wait_for(runs["signalled"] / "checkpoints" / "*step=4.ckpt")
    subprocess.run(["scancel", "-s", "USR1", jobs["signalled"]], env=slurm, check=True)
    wait_for(runs["requeued"] / "checkpoints" / "*step=4.ckpt")
    subprocess.run(["scontrol", "requeue", jobs["requeued"]], env=slurm, check=True)
    done = {name: wait_done(slurm, job_id) for name, job_id in jobs.items()}
    print(f"three 2-node training jobs: {time.monotonic() - start:.0f} s")

    for name, fields in done.items():
        log = Path(f"{runs[name]}.log").read_text()
        assert fields["JobState"] == "COMPLETED", (name, log[-3000:])
        assert fields["Restarts"] == ("0" if name == "straight" else "1"), name
        assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log, name  # one rank on each node
    signalled_log = Path(f"{runs['signalled']}.log").read_text()
    assert "SLURM warning signal: saved" in signalled_log and list(runs["signalled"].glob("hpc_ckpt_*.ckpt"))
    assert losses(runs["straight"]) == list(range(STEPS))  # rank 0 alone logs, each step once
    assert sorted(losses(runs["signalled"])) == list(range(STEPS))  # the requeued run continues the log

    reference = weights(runs["straight"])
    for name in ("signalled", "requeued"):
        resumed = weights(runs[name])
        assert resumed.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")


def test_eval_sbatch_scores_equal_the_single_process_command(slurm, inputs, tmp_path):
    """slurm/eval.sbatch under torchrun with 2 processes (2 placeholder GPUs → 2 ranks, gloo on CPU)."""
    from mme5.eval.__main__ import main as evaluate

    root, _ = inputs
    out = tmp_path / "sbatch-eval"
    job_id = sbatch(slurm, "eval.sbatch", ["--job-name", "mme5-eval", "--output", f"{out}.log",
                                           *LOCAL["eval.sbatch"].split()],
                    ["--device", "cpu", "--dtype", "float32", "--max-queries", "4"],
                    {"MODEL": root / "backbone", "MMEB": root / "world" / "mmeb",
                     "XTD": root / "world" / "xtd", "OUT": out})
    evaluate(["--model", str(root / "backbone"), "--mmeb", str(root / "world" / "mmeb"), "--xtd",
              str(root / "world" / "xtd"), "--out",
              str(tmp_path / "local"), "--device", "cpu", "--dtype", "float32", "--max-queries", "4"])
    fields = wait_done(slurm, job_id)
    assert fields["JobState"] == "COMPLETED", Path(f"{out}.log").read_text()[-3000:]
    assert list((out / "cache").rglob("part-*-r1.pt"))  # rank 1 of 2 encoded its share
    sbatch_scores = json.loads((out / "scores.json").read_text())["scalars"]
    local_scores = json.loads((tmp_path / "local" / "scores.json").read_text())["scalars"]
    assert sbatch_scores == pytest.approx(local_scores, abs=1e-6)


def test_synthesis_array_with_a_requeued_task_reads_back_as_one_source(slurm, inputs, tmp_path):
    """slurm/synthesize.sbatch as a 4-task array against the local chat server; task 2 is requeued while it
    works. The parts read back as one training source: every planned id once, none twice, no key written."""
    from test_synthesis_pipeline import KEY, KEY_ENV, AnswerServer, assert_no_key, settings

    from mme5.data.shards import read_samples, shard_urls
    from mme5.data.stream import Source
    from mme5.synthesis.config import PLAN
    from mme5.synthesis.plan import read_plan

    root, _ = inputs
    with AnswerServer(latency_s=0.5) as server:
        config = settings(tmp_path, server, num_samples=24, shard_size=4)
        values = vars(config) | {"client": config.client | {"base_url": None, "max_concurrency": 1}}
        config_file = tmp_path / "synthesis.yaml"
        config_file.write_text(json.dumps(values))  # JSON is YAML
        out = Path(config.out)
        array = sbatch(slurm, "synthesize.sbatch",
                       ["--job-name", "mme5-synth", "--output", f"{tmp_path}/synth-%a.log",
                        *LOCAL["synthesize.sbatch"].split()],
                       ["--base-url", server.base_url, "--embedder", str(root / "backbone")],
                       {"CONFIG": config_file, KEY_ENV: KEY})
        wait_for(out / "part-00002-of-00004" / "staging" / "*.tar")
        subprocess.run(["scontrol", "requeue", f"{array}_2"], env=slurm, check=True)
        tasks = [wait_done(slurm, f"{array}_{i}") for i in range(4)]
        requests = len(server.requests)
    logs = [Path(f"{tmp_path}/synth-{i}.log").read_text() for i in range(4)]
    assert [task["JobState"] for task in tasks] == ["COMPLETED"] * 4, logs
    assert [task["Restarts"] for task in tasks] == ["0", "0", "1", "0"]
    planned = [row.id for row in read_plan(out / PLAN)]
    source = Source(str(out))
    assert len(source.shard_dirs()) == 4
    ids = [sample.id for folder in source.shard_dirs() for sample in read_samples(shard_urls(folder))]
    assert sorted(ids) == sorted(planned) and len(set(ids)) == len(ids) == 24
    assert requests <= 24 + 1  # the requeued task asked only for what it had not committed (+1 in flight)
    assert_no_key(out)


@pytest.mark.parametrize("script", sorted(LOCAL))
def test_each_script_header_shows_the_local_cluster_command_the_tests_run(script):
    header = [line for line in (ROOT / "slurm" / script).read_text().splitlines() if line.startswith("#")]
    assert any("slurm/local/cluster.py" in line for line in header), script
    assert any(LOCAL[script] in line for line in header), (script, LOCAL[script])


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_a_requeue_onto_another_number_of_nodes_continues_the_epoch(slurm, inputs, before, after):
    """Train 8 steps on `before` nodes, resubmit the same run on `after` nodes: the second job finishes the
    epoch (160 samples) with the samples the first did not see, each sample trained on exactly once."""
    from mme5.data.shards import read_samples, shard_urls

    root, recipe = inputs
    run = root / f"nodes-{before}to{after}"
    batch = 4  # data.batch_size in the recipe: per rank
    first_steps, total = 8, 8 + (160 - 8 * batch * before) // (batch * after)
    env = {"CONFIG": recipe, "PYTHONPATH": ROOT / "tests"}
    for nodes, steps in ((before, first_steps), (after, total)):
        options = LOCAL["train.sbatch"].replace("--nodes 2", f"--nodes {nodes}").split()
        args = ["--trainer.default_root_dir", str(run), "--trainer.max_steps", str(steps),
                "--trainer.callbacks+=record_ids.RecordIds"]
        job_id = sbatch(slurm, "train.sbatch", ["--job-name", "mme5-resize", "--output", f"{run}.log",
                                                *options], args, env)
        fields = wait_done(slurm, job_id)
        assert fields["JobState"] == "COMPLETED", Path(f"{run}.log").read_text()[-3000:]
    trained = [i for path in sorted(run.glob("ids-*.jsonl")) for line in path.read_text().splitlines()
               for i in json.loads(line)["ids"]]
    everything = [sample.id for sample in read_samples(shard_urls(root / "world" / "train"))]
    assert len(everything) == 160 and len(trained) == 160
    assert sorted(trained) == sorted(everything)  # each sample once, none skipped
    assert "resuming on" in Path(f"{run}.log").read_text()  # the run said what it does
