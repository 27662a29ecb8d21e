"""MLLM answers become Samples from their revised data, or are rejected with a stable reason."""

import copy
import io
import json

import pytest
from PIL import Image

from mme5.data.schema import Modality, Task
from mme5.synthesis.plan import COMBINATIONS, PlannedSample
from mme5.synthesis.validation import SCRIPTS, InvalidAnswer, parse_answer, script_share


def png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = {"query": png("red"), "positive": png("green"), "negative": png("blue")}


def answer(modality, query="a red bus in a city street", positive="red bus", negative="red tram", **changes):
    """A well-formed answer; image-only sides get empty texts as the prompt asks."""
    modality = Modality(modality)
    sides = {"instruction": "Find the caption that matches the given image.",
             "query": query if "T" in modality.query else "",
             "positive": positive if "T" in modality.target else "",
             "hard_negative": negative if "T" in modality.target else ""}
    data = {
        "interpretation": {"general_description": "a street", "object_details": "a red bus",
                           "context": "daytime city", "task_brainstorm": "bus vs tram"},
        "draft": dict(sides),
        "evaluation": {"relevance": 4, "plausibility": 5, "clarity": 4, "diversity": 3, "comments": "ok"},
        "improvements": "be more specific",
        "revised": sides,
    }
    data["revised"].update(changes)
    return data


def parse(planned, data, images=IMAGES):
    return parse_answer(planned, data if isinstance(data, str) else json.dumps(data, ensure_ascii=False),
                        images)


@pytest.mark.parametrize(("task", "modality"), COMBINATIONS, ids=lambda v: str(v))
def test_good_answer_becomes_a_sample(task, modality):
    planned = PlannedSample("syn-3-7", task, modality, "en")
    parsed = parse(planned, answer(modality))
    sample = parsed.sample
    assert (sample.id, sample.task, sample.modality, sample.language, sample.source) == (
        "syn-3-7", task, modality, "en", "synthetic")
    assert sample.query.kind == modality.query and sample.positive.kind == modality.target
    assert [n.kind for n in sample.negatives] == [modality.target]
    assert sample.query.instruction == "Find the caption that matches the given image."
    target_instruction = "Represent the given image." if "I" in modality.target else ""
    assert sample.positive.instruction == sample.negatives[0].instruction == target_instruction
    assert sample.query.image == (IMAGES["query"] if "I" in modality.query else None)
    if "I" in modality.target:
        assert sample.positive.image == IMAGES["positive"] and sample.negatives[0].image == IMAGES["negative"]
    if "T" in modality.target:
        assert (sample.positive.text, sample.negatives[0].text) == ("red bus", "red tram")
    assert parsed.metadata["interpretation"]["object_details"] == "a red bus"
    assert parsed.metadata["evaluation"]["diversity"] == 3
    assert set(parsed.metadata) == {"interpretation", "draft", "evaluation", "improvements"}


def test_revised_data_wins_over_the_draft():
    planned = PlannedSample("s", Task.VQA, Modality.IT2T, "en")
    data = answer(Modality.IT2T, positive="two buses")
    data["draft"]["positive"] = "one bus"
    assert parse(planned, data).sample.positive.text == "two buses"


def test_text_of_an_image_only_side_is_ignored():
    planned = PlannedSample("s", Task.RETRIEVAL, Modality.I2I, "en")
    data = answer(Modality.I2I, query="stray text")
    assert parse(planned, data).sample.query.text is None


def test_fenced_json_is_accepted():
    planned = PlannedSample("s", Task.RETRIEVAL, Modality.I2T, "en")
    content = "Here it is:\n```json\n" + json.dumps(answer(Modality.I2T)) + "\n```\n"
    assert parse(planned, content).sample.positive.text == "red bus"


@pytest.mark.parametrize(("language", "query", "positive", "negative"), [
    ("ru", "Красный автобус на улице города", "красный автобус", "красный трамвай"),
    ("zh", "城市街道上的红色公共汽车", "红色公共汽车", "红色电车"),
    ("ja", "街を走る赤いバス", "赤いバス", "赤い路面電車"),
    ("ar", "حافلة حمراء في شارع المدينة", "حافلة حمراء", "ترام أحمر"),
    ("de", "Ein roter Bus auf einer Straße", "roter Bus", "rote Straßenbahn"),
])
def test_native_script_passes(language, query, positive, negative):
    planned = PlannedSample("s", Task.RETRIEVAL, Modality.IT2T, language)
    sample = parse(planned, answer(Modality.IT2T, query=query, positive=positive, negative=negative)).sample
    assert sample.query.text == query and sample.language == language


def test_script_share():
    assert script_share("abc Жук", SCRIPTS["ru"]) == pytest.approx(3 / 6)
    assert script_share("42 !", SCRIPTS["ru"]) is None


def reject(planned, data, reason, images=IMAGES):
    with pytest.raises(InvalidAnswer) as caught:
        parse(planned, data, images)
    assert caught.value.reason == reason
    return caught.value


IT2T = PlannedSample("s", Task.VQA, Modality.IT2T, "en")


def test_not_json():
    reject(IT2T, "I cannot help with that.", "not_json")
    reject(IT2T, "```json\n{\"revised\": \n```", "not_json")


def test_missing_field():
    data = answer(Modality.IT2T)
    del data["evaluation"]["clarity"]
    assert "clarity" in reject(IT2T, data, "schema").detail


def test_extra_field():
    data = answer(Modality.IT2T)
    data["revised"]["notes"] = "x"
    assert "notes" in reject(IT2T, data, "schema").detail


@pytest.mark.parametrize("bad", ["4", 6, 4.5, True])
def test_bad_score(bad):
    data = answer(Modality.IT2T)
    data["evaluation"]["relevance"] = bad
    reject(IT2T, data, "schema")


def test_not_an_object():
    reject(IT2T, "[1, 2]", "schema")


def test_empty_query_text_for_a_text_query():
    planned = PlannedSample("s", Task.RETRIEVAL, Modality.T2I, "en")
    assert "query" in reject(planned, answer(Modality.T2I, query="  "), "empty_field").detail


def test_empty_positive_and_instruction():
    reject(IT2T, answer(Modality.IT2T, positive=""), "empty_field")
    reject(IT2T, answer(Modality.IT2T, instruction=" "), "empty_field")


def test_missing_image():
    images = dict(IMAGES, negative=None)
    reject(PlannedSample("s", Task.RETRIEVAL, Modality.I2I, "en"), answer(Modality.I2I), "missing_image",
           images)


@pytest.mark.parametrize("language", ["ru", "zh", "ko", "hi"])
def test_latin_text_for_a_non_latin_language(language):
    planned = PlannedSample("s", Task.RETRIEVAL, Modality.IT2T, language)
    reject(planned, answer(Modality.IT2T), "wrong_script")


def test_non_latin_text_for_a_latin_language():
    planned = PlannedSample("s", Task.RETRIEVAL, Modality.IT2T, "fr")
    reject(planned, answer(Modality.IT2T, query="红色公共汽车", positive="红色公共汽车"), "wrong_script")


def test_positive_equals_negative():
    data = answer(Modality.IT2T, positive="Red bus", negative=" red  BUS ")
    reject(IT2T, data, "identical_positive_negative")


def test_answer_dict_is_not_modified():
    data = answer(Modality.IT2T)
    before = copy.deepcopy(data)
    parse(IT2T, data)
    assert data == before
