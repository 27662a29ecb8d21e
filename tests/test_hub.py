"""Model references: the identity a command records for a model it has not loaded yet."""

import os

from mme5.hub import model_identity


def test_a_local_model_is_named_by_its_files_and_a_hub_id_as_written(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    first = model_identity(tmp_path / "m")
    assert first["model"] == str((tmp_path / "m").resolve()) and first == model_identity(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text('{"hidden_size": 8}')
    os.utime(tmp_path / "m" / "config.json", ns=(1, 1))
    assert model_identity(tmp_path / "m")["model_files"] != first["model_files"]  # other weights, other model
    hub_id = "intfloat/mmE5-mllama-11b-instruct@v1"
    assert model_identity(hub_id) == {"model": hub_id}  # nothing downloaded to name it
