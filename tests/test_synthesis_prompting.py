"""The synthesis prompt names what the MLLM must know, the schema is strict, the templates ship."""

import json
import tomllib
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import pytest

from mme5.data.schema import Modality, Task
from mme5.synthesis.languages import LANGUAGES
from mme5.synthesis.plan import COMBINATIONS, PlannedSample
from mme5.synthesis.prompting import build_request, image_roles, json_instruction, response_schema

ROOT = Path(__file__).resolve().parents[1]
ROLE_WORDS = {"query": "the query image", "positive": "the positive image",
              "negative": "the hard-negative image"}


@pytest.mark.parametrize(("task", "modality"), COMBINATIONS, ids=lambda v: str(v))
def test_prompt_names_task_modality_language_and_images(task, modality):
    planned = PlannedSample("syn-0-1", task, modality, "sw")
    roles = image_roles(modality)
    request = build_request(planned, len(roles))
    assert request.image_roles == roles
    assert "Swahili" in request.prompt and f"{task} training sample" in request.prompt
    assert f"Modality combination: {modality}" in request.prompt
    for number, role in enumerate(roles, start=1):
        assert f"- Image {number}: {ROLE_WORDS[role]}" in request.prompt
    assert request.prompt.count("- Image ") == len(roles)
    assert "$" not in request.prompt and request.system
    if "I" in modality.query and "T" not in modality.query:
        assert '- query: an empty string ""' in request.prompt
    if modality.target == "I":
        assert '- positive: an empty string ""' in request.prompt


def test_image_roles_follow_the_modality():
    assert image_roles(Modality.I2T) == ("query",)
    assert image_roles(Modality.T2I) == ("positive", "negative")
    assert image_roles(Modality.IT2IT) == ("query", "positive", "negative")


def test_wrong_image_count_is_rejected():
    with pytest.raises(ValueError, match="needs 3 image"):
        build_request(PlannedSample("syn-0-1", Task.RETRIEVAL, Modality.I2I, "en"), 1)


def test_schema_is_strict():
    schema = response_schema(PlannedSample("syn-0-1", Task.VQA, Modality.IT2T, "en"))

    def walk(node, path):
        if node["type"] == "object":
            assert node["additionalProperties"] is False, path
            assert node["required"] == list(node["properties"]), path
            for name, sub in node["properties"].items():
                walk(sub, f"{path}.{name}")
        nodes.append(path)

    nodes = []
    walk(schema, "$")
    assert set(schema["properties"]) == {"interpretation", "draft", "evaluation", "improvements", "revised"}
    assert schema["properties"]["evaluation"]["properties"]["clarity"]["enum"] == [1, 2, 3, 4, 5]
    assert set(schema["properties"]["revised"]["properties"]) == {"instruction", "query", "positive",
                                                                  "hard_negative"}
    assert "$.interpretation.task_brainstorm" in nodes


def test_json_instruction_carries_the_schema():
    request = build_request(PlannedSample("syn-0-1", Task.RETRIEVAL, Modality.T2I, "zh"), 2)
    text = json_instruction(request.schema)
    assert json.loads(text[text.index("{"):]) == request.schema
    assert request.fallback_prompt.startswith(request.prompt) and request.fallback_prompt.endswith(text)


def test_every_language_renders():
    for code in LANGUAGES:
        assert LANGUAGES[code] in build_request(PlannedSample("x", Task.VQA, Modality.IT2T, code), 1).prompt


def test_templates_load_from_the_package_and_ship_as_package_data():
    prompts = resources.files("mme5.synthesis").joinpath("prompts")
    names = sorted(p.name for p in prompts.iterdir() if p.name.endswith(".txt"))
    assert {"system.txt", "synthesize.txt", "json_instruction.txt", "task_classification.txt",
            "task_vqa.txt", "task_retrieval.txt"} <= set(names)
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for name in names:
        assert any(fnmatch(f"synthesis/prompts/{name}", pattern) for pattern in package_data["mme5"]), name
