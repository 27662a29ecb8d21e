"""mme5.analysis and notebooks/analyze_runs.ipynb against small synthetic runs written with real writers."""

import json
import re
from pathlib import Path

import matplotlib
import nbformat
import pytest
import yaml
from matplotlib.figure import Figure
from nbclient import NotebookClient
from torch.utils.tensorboard import SummaryWriter

from mme5 import analysis
from mme5.data.shards import FORMAT
from mme5.eval.report import HEADLINE

matplotlib.use("Agg")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "analyze_runs.ipynb"
LANGUAGES = ("de", "en")
TRAIN_STEPS = (10, 20, 30)
EVAL_STEPS = (0, 30)


def _train_value(tag: str, step: int) -> float:
    return {"train/loss": 3.0 - step / 20, "train/lr": step * 1e-5}.get(tag, step / 100)


def _eval_value(offset: float, step: int) -> float:
    return offset + step / 2


def _eval_tags() -> list[str]:
    tags = [f"eval/mmeb/{key}" for key in HEADLINE]
    for name in (*LANGUAGES, "mean", "mean_all"):
        for k in (1, 5, 10):
            tags += [f"eval/xtd/{name}_r{k}", f"eval/xtd/{name}_i2t_r{k}"]
    return tags


def _scores(overall: float) -> dict:
    """A scores.json in the shape `python -m mme5.eval` writes, trimmed to one dataset."""
    ranks = {"precision@1": overall / 2, "recall@1": overall / 2, "recall@5": overall,
             "recall@10": overall + 5}
    mmeb = {"metric": "precision@1", **{key: overall + i for i, key in enumerate(HEADLINE)}}
    mmeb["datasets"] = {"Shape": {"meta_task": "Classification", "split": "IND", **ranks, "queries": 10}}
    languages = {lang: {"t2i": {**ranks, "recall@10": overall + i}, "i2t": ranks}
                 for i, lang in enumerate(LANGUAGES)}
    xtd = {"format": "xtd10", "paper_languages": ["de"], "languages": languages,
           "mean": {"t2i": ranks, "i2t": ranks}, "mean_all": {"t2i": ranks, "i2t": ranks}}
    return {"model": {"name": "last.ckpt"}, "mmeb": mmeb, "xtd": xtd}


def make_run(root: Path, name: str, offset: float, num_samples: int, max_samples: int | None = None) -> Path:
    """A run folder as training and `mme5.eval` leave it: event files, config.yaml, two scores.json."""
    run = root / name
    writer = SummaryWriter(str(run / "tensorboard"))
    for step in TRAIN_STEPS:
        for tag, _ in analysis.TRAIN_TAGS:
            writer.add_scalar(tag, _train_value(tag, step), step)
    for step in EVAL_STEPS:
        for tag in _eval_tags():
            writer.add_scalar(tag, _eval_value(offset, step), step)
    writer.close()
    shards = root / f"{name}-shards"
    shards.mkdir()
    shards_listed = [{"file": "shard-000000.tar", "count": num_samples}]  # num_samples must add up
    manifest = {"format": FORMAT, "complete": True, "num_samples": num_samples, "shards": shards_listed}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    config = {"data": {"sources": [{"path": str(shards), "weight": None, "max_samples": max_samples}]}}
    (run / "tensorboard" / "config.yaml").write_text(yaml.safe_dump(config))
    for eval_name, overall in (("untrained", 5.0), ("trained", 20.0 + offset)):
        (run / "eval" / eval_name).mkdir(parents=True)
        (run / "eval" / eval_name / "scores.json").write_text(json.dumps(_scores(overall)))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_run(root, "small", 1.0, 100), make_run(root, "large", 4.0, 5000, max_samples=1000)


def test_scalars_read_back_what_was_written(runs):
    scalars = analysis.load_scalars(runs[0])
    for tag, _ in analysis.TRAIN_TAGS:
        assert [s for s, _ in scalars[tag]] == list(TRAIN_STEPS)
        assert [v for _, v in scalars[tag]] == pytest.approx([_train_value(tag, s) for s in TRAIN_STEPS])
    assert scalars["eval/mmeb/Overall"] == [(s, _eval_value(1.0, s)) for s in EVAL_STEPS]  # exact in float32
    assert analysis.xtd_languages(scalars) == list(LANGUAGES)


def test_scores_and_synthetic_sizes(runs):
    scores = analysis.load_scores(runs[1])
    assert set(scores) == {"trained", "untrained"}
    assert scores["trained"] == _scores(24.0)
    row = analysis.headline(scores["trained"])
    assert row["Overall"] == 24.0 + HEADLINE.index("Overall")
    assert row["XTD R@10 mean (paper langs)"] == 29.0
    assert analysis.synthetic_data_size(runs[0]) == 100
    assert analysis.synthetic_data_size(runs[1]) == 1000  # capped by max_samples


def test_missing_inputs_name_the_path(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        analysis.load_scalars(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "eval"))):
        analysis.load_scores(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        analysis.synthetic_data_size(tmp_path)
    with pytest.raises(KeyError, match=re.escape(f"{runs[0] / 'tensorboard'}: no scalar tag 'train/nope'")):
        analysis.load_scalars(runs[0])["train/nope"]
    with pytest.raises(KeyError, match="no evaluation 'best'.*trained, untrained"):
        analysis.load_scores(runs[0])["best"]


def test_plots_draw_one_line_per_run(runs):
    scalars = {run.name: analysis.load_scalars(run) for run in runs}
    training = analysis.plot_training(scalars)
    assert isinstance(training, Figure)
    visible = [axis for axis in training.axes if axis.get_visible()]
    assert [axis.get_title() for axis in visible] == [title for _, title in analysis.TRAIN_TAGS]
    assert all(len(axis.lines) == 2 for axis in visible)
    assert len([a for a in analysis.plot_mmeb(scalars).axes if a.get_visible()]) == len(HEADLINE)
    xtd = analysis.plot_xtd(scalars, "i2t")
    titles = [axis.get_title() for axis in xtd.axes if axis.get_visible()]
    assert titles == ["mean (paper langs)", "mean (all langs)", *LANGUAGES]
    line = xtd.axes[2].lines[0]
    assert list(line.get_ydata()) == pytest.approx([_eval_value(1.0, s) for s in EVAL_STEPS])
    points = {run.name: (analysis.synthetic_data_size(run), analysis.load_scores(run)["trained"])
              for run in runs}
    by_size = analysis.plot_score_vs_size(points)
    assert by_size.axes[0].get_xscale() == "log"
    assert list(by_size.axes[0].lines[0].get_xdata()) == [100, 1000]
    finals = {run.name: analysis.load_scores(run)["trained"] for run in runs}
    assert len(analysis.plot_xtd_final(finals).axes[0].patches) == len(runs) * len(LANGUAGES)


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") and not cell.get("execution_count")
               for cell in notebook.cells if cell.cell_type == "code")


def test_notebook_runs_end_to_end(runs, monkeypatch):
    monkeypatch.setenv("MME5_RUNS", ",".join(str(run) for run in runs))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    setup = next(cell for cell in notebook.cells if "SYNTHETIC_SIZES = {}" in cell.source)
    sizes = f"SYNTHETIC_SIZES = {{{str(runs[0])!r}: 123}}"
    setup.source = setup.source.replace("SYNTHETIC_SIZES = {}", sizes)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 6  # training, MMEB, XTD t2i and i2t, XTD per language, score vs size
    text = "".join(output.get("text", "") for output in outputs)
    assert "small: 123 synthetic samples" in text and "large: 1000 synthetic samples" in text


def test_compare_keeps_one_row_per_run_when_folders_share_a_name(tmp_path, capsys):
    """Runs whose score folders are all called `eval` each keep their row, named by their parents."""
    from mme5.eval import compare

    runs = []
    for name, overall in (("plain", 20.0), ("mined", 30.0), ("demo/trained", 40.0)):
        folder = tmp_path / name / ("eval" if "/" not in name else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scores.json").write_text(json.dumps(_scores(overall)))
        runs.append(str(folder))
    compare.main(runs)
    rows = [line.split(" | ")[0].strip("| ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["plain/eval", "mined/eval", "trained"]
    with pytest.raises(SystemExit):
        compare.main([*runs[:2], "--names", "a", "a"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # one run twice: said so (was "row names must differ: ['//tmp/...']")
        compare.main([runs[0], str(Path(runs[0]) / "scores.json")])
    assert "given more than once" in capsys.readouterr().err
