"""The family matrix: every registered backbone family (`sorted(mme5.backbones.ADAPTERS)`) gets what the
project promises of a family, on its tiny `test` backbone. A family joins the matrix by being registered.

- the demo recipe (`configs/demo.yaml`, gradient cache on) trains it for 3 steps through the real CLI;
- that run's merged export embeds in the real sentence-transformers as in `Embedder` (1e-5), for text, image
  and image+text inputs; its `--adapter-only` export is a PEFT folder equal to the merged export;
- the real `mteb.evaluate` on the export scores XTD as `python -m mme5.eval` does;
- its chat template renders the project's prompt where vLLM serves the family (`CHAT_TEMPLATE_FAMILIES`);
- 2-process DDP and FSDP (gloo) gradients equal the single-process full-batch gradient.

One training run per family feeds both exports; the module-scoped fixtures make pytest run one family's tests
together.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from helpers import DOCUMENT, QUERY, write_pngs
from PIL import Image
from test_train import assert_same_gradients, full_batch_gradient, run_distributed

import mme5
from mme5.backbones import ADAPTERS
from mme5.backbones.tiny import build_tiny
from mme5.checkpoint import load_encoder
from mme5.demo.world import WorldConfig, build_world
from mme5.eval.__main__ import main as evaluate
from mme5.export import CHAT_TEMPLATE_FAMILIES, export

st = pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.slow  # ~1 minute of 2 CPU cores per family: left out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]
FAMILIES = sorted(ADAPTERS)
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
STEPS = 3


@dataclass(frozen=True)
class Trained:
    """A family's tiny backbone, the checkpoint of its 3-step demo run, and that checkpoint's exports."""

    family: str
    backbone: Path
    ckpt: Path
    merged: Path
    adapter: Path


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def backbone(family, tmp_path_factory) -> Path:
    return build_tiny(family, tmp_path_factory.mktemp(family) / "backbone", seed=0, preset="test")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A demo world just large enough for 3 steps of 8 samples and the recipe's step-0 evaluation."""
    out = tmp_path_factory.mktemp("world")
    build_world(out, WorldConfig(train_samples=STEPS * 8, eval_queries=2, eval_candidates=3, xtd_images=3,
                                 v2_queries=2, languages=("en", "zh")), progress=False)
    return out


def demo_recipe(family: str, root: Path) -> Path:
    """configs/demo.yaml; for a family that reads no video, without its MMEB-V2 callback (the demo's V2 sets
    hold clips, which such a family refuses; its collator skips the clip samples)."""
    recipe = REPO / "configs" / "demo.yaml"
    if ADAPTERS[family].reads_video:
        return recipe
    config = yaml.safe_load(recipe.read_text())
    callbacks = config["trainer"]["callbacks"]
    config["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].endswith(".MMEBV2Eval")]
    (root / "demo.yaml").write_text(yaml.safe_dump(config))
    return root / "demo.yaml"


def train_demo(backbone: Path, world: Path, root: Path, family: str) -> subprocess.CompletedProcess:
    """`train.py fit --config configs/demo.yaml` for 3 steps with `model.backbone` set to `backbone`.

    The demo recipe as it is (gradient cache, hard negatives, step-0 MMEB/XTD evaluation) but small batches,
    and LoRA (DoRA) adapters instead of its full fine-tuning, so that one run feeds both exports; warmup 1
    so that 3 steps move the adapters off their initialisation.
    """
    root.mkdir(parents=True)
    (root / "world").symlink_to(world, target_is_directory=True)  # the recipe's paths derive from the root
    lora = json.dumps({"r": 2, "alpha": 4, "dropout": 0.0})
    command = [sys.executable, "train.py", "fit", "--config", str(demo_recipe(family, root)),
               "--trainer.default_root_dir", str(root), "--model.backbone", str(backbone),
               "--trainer.max_steps", str(STEPS), "--trainer.enable_progress_bar", "false",
               "--data.batch_size", "8", "--model.chunk_size", "3", "--data.num_workers", "0",
               "--model.input_format.max_length", "64", "--model.warmup", "1", "--model.lora", lora]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(family, backbone, world) -> Trained:
    """The family's demo run and its merged and adapter-only exports (the run is checked in its own test)."""
    root = backbone.parent
    run = train_demo(backbone, world, root / "run", family)
    assert run.returncode == 0, run.stderr[-4000:]
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    merged = export(ckpt, root / "merged", query_instruction=QUERY, target_instruction=DOCUMENT)
    adapter = export(ckpt, root / "adapter", query_instruction=QUERY, target_instruction=DOCUMENT,
                     adapter_only=True)
    return Trained(family, backbone, ckpt, merged, adapter)


@pytest.fixture(scope="module")
def xtd_world(tmp_path_factory) -> Path:
    """XTD10-layout files in three languages, enough images that recall@k differs between tasks."""
    out = tmp_path_factory.mktemp("xtd-world")
    build_world(out, WorldConfig(train_samples=0, eval_queries=2, eval_candidates=4, xtd_images=12,
                                 languages=("en", "zh", "es")), progress=False)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_pngs(tmp_path_factory.mktemp("pictures"), COLORS, width=28, step=4)


def mixed_inputs(images):
    return ["a red square on white", Image.open(images[0]), str(images[1]),
            {"text": "a blue square", "image": Image.open(images[2])},
            {"text": "yellow", "image": str(images[3])},
            "a much longer caption about a green square and a cat"]


def test_demo_recipe_trains_3_steps_with_the_gradient_cache(trained):
    """The fixture's run: 3 steps of the demo recipe, gradient cache on, adapters moved off their init."""
    loaded = load_encoder(trained.ckpt)
    assert loaded.recipe["global_step"] == STEPS
    hparams = loaded.recipe["hyper_parameters"]
    assert hparams["gradient_cache"] and hparams["chunk_size"] == 3  # 8 queries a step: 3 chunks
    assert str(trained.backbone) == hparams["backbone"]
    # B starts at zero (LLaVA's last vision layer gets no gradient: its output is not used)
    assert any(w.abs().max() > 1e-4 for name, w in loaded.encoder.named_parameters() if "lora_B" in name)


def test_sentence_transformers_embeds_as_the_embedder(trained, images):
    """The real SentenceTransformer on the merged export: text, image and image+text inputs mixed in one call,
    the export's instructions as its query/document prompts, within 1e-5 of Embedder (and L2-normalised)."""
    model = st.SentenceTransformer(str(trained.merged), trust_remote_code=True, device="cpu")
    embedder = mme5.Embedder.from_pretrained(trained.merged, device="cpu")
    inputs = mixed_inputs(images)
    expected_query = embedder.encode_query(inputs)
    assert model.prompts == {"query": QUERY, "document": DOCUMENT}
    got = model.encode_query(inputs, convert_to_tensor=True, batch_size=4)
    torch.testing.assert_close(got, expected_query, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(inputs)))
    got = model.encode_document(inputs, convert_to_tensor=True, batch_size=3)
    torch.testing.assert_close(got, embedder.encode_document(inputs), atol=1e-5, rtol=0)
    plain = model.encode(inputs[:1])  # no prompt: no instruction (numpy, as sentence-transformers returns)
    torch.testing.assert_close(torch.from_numpy(plain), embedder.encode(inputs[:1]), atol=1e-5, rtol=0)
    assert model.get_embedding_dimension() == embedder.dim
    assert model.similarity(got, got).shape == (len(inputs), len(inputs))


def test_adapter_only_export_is_a_peft_folder_that_loads_on_the_base(trained, images):
    """`--adapter-only`: the real PEFT loads it on the base backbone; merged, its weights are the merged
    export's (which differ from the base), and the project (Embedder, sentence-transformers) embeds it as the
    merged export."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    config = json.loads((trained.adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(trained.backbone.resolve()) and config["use_dora"]
    assert (trained.adapter / "adapter_model.safetensors").is_file()
    assert not (trained.adapter / "config.json").exists()
    base = AutoModelForImageTextToText.from_pretrained(trained.backbone)
    untouched = {name: weight.clone() for name, weight in base.state_dict().items()}
    with_adapter = PeftModel.from_pretrained(base, trained.adapter).merge_and_unload().state_dict()
    reference = AutoModelForImageTextToText.from_pretrained(trained.merged).state_dict()
    assert with_adapter.keys() == reference.keys()
    for name, weight in reference.items():
        torch.testing.assert_close(with_adapter[name], weight, atol=1e-5, rtol=0, msg=name)
    assert any((untouched[name] - weight).abs().max() > 1e-4 for name, weight in reference.items())

    loaded = load_encoder(trained.adapter)
    assert loaded.description["kind"] == "adapter" and loaded.encoder.has_adapters
    inputs = mixed_inputs(images)
    expected = mme5.Embedder.from_pretrained(trained.merged, device="cpu").encode_query(inputs)
    got = mme5.Embedder.from_pretrained(trained.adapter, device="cpu").encode_query(inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    model = st.SentenceTransformer(str(trained.adapter), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(model.encode_query(inputs, convert_to_tensor=True), expected, atol=1e-5,
                               rtol=0)


def test_chat_template_only_where_vllm_serves_the_family(trained):
    """What it renders is checked against the project's prompt in tests/test_published.py."""
    template = trained.merged / "chat_template.jinja"
    if trained.family in CHAT_TEMPLATE_FAMILIES:
        image_token = load_encoder(trained.merged).encoder.adapter.image_token
        assert image_token in template.read_text()
    else:
        assert not template.exists()


def test_mteb_scores_equal_mme5_eval_on_the_same_xtd_items(trained, xtd_world, tmp_path, monkeypatch):
    """The real mteb.evaluate on XTD made into local mteb tasks (the demo world's XTD10 files): its recall@k
    equals mme5.eval's for every language and direction."""
    monkeypatch.setenv("MTEB_CACHE", str(tmp_path / "mteb-cache"))
    mteb = pytest.importorskip("mteb")
    from mme5.integrations.mteb import main as mteb_main
    from mme5.integrations.mteb import mteb_model, xtd_tasks

    merged, world = trained.merged, xtd_world
    evaluate(["--model", str(merged), "--benchmark", "xtd", "--data", str(world), "--out",
              str(tmp_path / "eval"), "--no-cache", "--device", "cpu"])
    expected = json.loads((tmp_path / "eval" / "scores.json").read_text())["xtd"]["languages"]
    tasks = xtd_tasks(world / "xtd")
    assert sorted(task.metadata.name for task in tasks) == sorted(
        f"XTD-{code}-{d}" for code in ("en", "zh", "es") for d in ("t2i", "i2t"))
    results = mteb.evaluate(mteb_model(merged, device="cpu"), tasks=tasks, cache=None, co2_tracker=False,
                            encode_kwargs={"batch_size": 5, "show_progress_bar": False},
                            show_progress_bar=False)
    for task, result in zip(tasks, results.task_results, strict=True):
        _, code, direction = task.metadata.name.split("-")
        scores = result.scores["test"][0]
        for k in (1, 5, 10):
            assert 100 * scores[f"recall_at_{k}"] == pytest.approx(expected[code][direction][f"recall@{k}"],
                                                                   abs=1e-3), (task.metadata.name, k)
    recalls = {round(r.scores["test"][0][f"recall_at_{k}"], 4) for r in results.task_results for k in (1, 5)}
    assert len(recalls) > 1  # not all equal: the comparison is not a vacuous one of constant scores

    mteb_main(["--model", str(merged), "--xtd", str(world / "xtd"), "--languages", "en", "--out",
               str(tmp_path / "mteb-out"), "--device", "cpu"])
    (result,) = (tmp_path / "mteb-out").rglob("XTD-en-t2i.json")
    # filed under the model's fingerprint (mteb's revision): another model named alike never overwrites it
    assert result.parent.name == load_encoder(merged).fingerprint


# FSDP units holding adapters of the default LoRA targets (q/k/v/o_proj, down_proj) that take part in the
# backward, one reduce-scatter each per step: the test preset's 2 decoder layers, plus its 2 vision layers
# where their names match (SigLIP attention; Qwen2.5-VL's vision MLP down_proj). Mllama: 3 vision layers, 1
# self-attention and 1 cross-attention decoder layer. LLaVA reads the CLIP layer before the last
# (vision_feature_layer -2): the last one gets no gradient. Qwen2-VL/Qwen3-VL/Qwen3.5 vision blocks (attn.qkv,
# linear_fc*) hold none; Qwen3.5's linear-attention layer holds its MLP's down_proj. Qwen2.5-VL reads video:
# a lockstep chunk runs its vision tower twice (image rows, then the placeholder video row that keeps ranks
# in step), and one of its 2 adapted vision units then reduce-scatters once more (4 without the video row,
# measured); so does LLaVA-OneVision's since it reads video (5, measured; 4 before). A new family states its
# count here.
ADAPTED_BLOCKS = {"mllama": 5, "qwen2_vl": 2, "llava": 3, "qwen3_vl": 2, "qwen2_5_vl": 5, "gemma3": 4,
                  "qwen3_5": 2, "llava_onevision": 5}
# DDP: none by its own reducer, one explicit flat all-reduce (a tiny model fits one bucket), however many
# backwards the gradient cache ran.
DDP_COMMUNICATION = {"ddp": 0, "explicit": 1, "reduce_scatter": 0}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_gradient_equals_the_full_batch_gradient(family, backbone, tiny_shards, strategy,
                                                             tmp_path):
    """2 processes (gloo), gradient cache on: the gradient equals one process's on both ranks' batches, with
    one gradient reduction per step. Image tokens inline in the text (Qwen's 3-D rope, Gemma 3's bidirectional
    image attention) as well as Mllama's cross-attention; every adapted layer is its own FSDP unit."""
    assert family in ADAPTED_BLOCKS, f"{family}: count its FSDP units holding adapters in ADAPTED_BLOCKS"
    record = run_distributed(tmp_path, str(backbone), tiny_shards, strategy)
    assert len(record["ids"]) == 2 and not set(record["ids"][0]) & set(record["ids"][1])
    expected = DDP_COMMUNICATION if strategy == "ddp" else {"ddp": 0, "explicit": 0,
                                                            "reduce_scatter": ADAPTED_BLOCKS[family]}
    assert record["allreduces"] == expected
    assert_same_gradients(record, full_batch_gradient(str(backbone), tiny_shards, record))
