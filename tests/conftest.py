"""Session fixtures: a tiny backbone saved to disk once, and tiny training shards."""

import pytest
from helpers import make_sample

from mme5.backbones.tiny import build_tiny
from mme5.data.schema import Modality
from mme5.data.shards import ShardWriter
from mme5.demo.world import WorldConfig, build_world


@pytest.fixture(scope="session")
def tiny_mllama(tmp_path_factory):
    """A tiny random Mllama folder, loaded by tests through the same path as a real checkpoint."""
    return str(build_tiny("mllama", tmp_path_factory.mktemp("mllama"), seed=0, preset="test"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """`tiny(family)`: a tiny random backbone folder of that family (`test` preset, seed 0), built on
    first use and shared by the session."""
    built = {}

    def folder(family: str):
        if family not in built:
            built[family] = build_tiny(family, tmp_path_factory.mktemp(family), seed=0, preset="test")
        return built[family]

    return folder


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """96 samples over all seven modality combinations, 0–2 hard negatives each, in 4 shards."""
    path = tmp_path_factory.mktemp("shards")
    modalities = list(Modality)
    with ShardWriter(path, max_count=24) as writer:
        for i in range(96):
            language = ["en", "zh", "ru"][i % 3]
            writer.write(make_sample(i, modalities[i % 7], negatives=i % 3, language=language))
    return str(path)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A demo world of a few samples, queries and candidates a set, in three languages."""
    root = tmp_path_factory.mktemp("world")
    build_world(root, WorldConfig(train_samples=48, eval_queries=3, eval_candidates=4, xtd_images=5,
                                  v2_queries=3, languages=("en", "es", "zh")), progress=False)
    return root


@pytest.fixture(scope="session")
def demo_backbone(tiny) -> str:
    """The demo's family (it reads the world's clips): a tiny Qwen2-VL."""
    return str(tiny("qwen2_vl"))
