"""Synthesis settings files: every shipped one parses, and a malformed one is named with its file and key."""

import re

import pytest

from mme5.synthesis.__main__ import main as cli_main
from mme5.synthesis.config import SynthesisConfig, planned_samples, read_settings


def test_the_shipped_config_parses():
    values = read_settings("configs/synthesis/default.yaml")
    assert SynthesisConfig.from_dict(values).client_config().model == "gpt-4o"


@pytest.mark.parametrize("text, message", [
    ("- out: runs/x\n- seed: 1\n", r"expected a mapping of settings .* found a list"),
    ("just words\n", r"expected a mapping of settings .* found a str"),
    ("num_samples: ten\n", r"num_samples: expected an integer, found str 'ten'"),
    ("english_share: lots\n", r"english_share: expected a number, found str"),
    ("positive_ranks: {low: 1, high: 5}\n", r"positive_ranks: expected a list of integers, found dict"),
    ("positive_ranks: [1, five]\n", r"positive_ranks: expected a list of integers, found list"),
    ("combination_weights: [retrieval/I2T]\n", r"combination_weights: expected a mapping of strings to "
                                               r"numbers or null, found list"),
    ("use_response_format: 'no'\n", r"use_response_format: expected true or false, found str"),
    ("client: [gpt-4o]\n", r"client: expected a mapping of strings to values, found list"),
    ("client:\n  model: gpt-4o\n  timeout_s: fast\n", r"client: timeout_s: expected a number, found str"),
    ("client:\n  model: [gpt-4o]\n", r"client: model: expected a string, found list"),
    ("seed: 1\n  out: [\n", r"not valid YAML"),
])
def test_a_malformed_settings_file_is_named_with_its_key(tmp_path, capsys, text, message):
    config_file = tmp_path / "my-synthesis.yaml"
    config_file.write_text(text)
    with pytest.raises(ValueError, match=rf"my-synthesis\.yaml: {message}"):
        read_settings(config_file)
    # the command line: a message and exit status 2, no traceback, nothing written
    assert cli_main(["--config", str(config_file), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {config_file}:") and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_a_missing_or_undecodable_file_is_a_message(tmp_path, capsys):
    assert cli_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("out: caf\xe9\n".encode("latin-1"))
    assert cli_main(["--config", str(latin)]) == 2
    assert "latin.yaml: not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [("seed: 1\n", r"synthesis settings: missing settings \['out'\]"),
                                           ("out: x\nclient: {timeout_s: 5}\n",
                                            r"client: missing settings \['model'\]")])
def test_a_missing_required_setting_is_named(tmp_path, capsys, text, message):
    config_file = tmp_path / "synthesis.yaml"
    config_file.write_text(text)
    assert cli_main(["--config", str(config_file)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_an_unknown_combination_names_the_known_ones(tmp_path):
    config = SynthesisConfig(out=str(tmp_path), combination_weights={"retrieval": 1.0})
    with pytest.raises(ValueError, match=r"combination_weights: 'retrieval' is not one of .*'retrieval/I2T'"):
        planned_samples(config)


def test_settings_of_the_right_types_pass(tmp_path):
    config_file = tmp_path / "ok.yaml"
    config_file.write_text("out: x\nenglish_share: 1\nimages: null\ncombination_weights: {retrieval/I2T: 2}\n"
                           "client: {model: m, temperature: 0, max_tokens: null}\n")
    values = read_settings(config_file)
    assert SynthesisConfig.from_dict(values).combination_weights == {"retrieval/I2T": 2}
