"""Image pool, neighbour picks in their rank bands, the embedding cache, and the encoder embedder."""

import io
import tarfile

import pytest
import torch
from PIL import Image

from mme5.data.schema import Modality, Task
from mme5.images import load_rgb
from mme5.synthesis.images import ImagePool, NeighbourIndex, encoder_embedder, select_images
from mme5.synthesis.plan import PlannedSample


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (i * 4 % 256, 255 - i * 4 % 256, (i * 37) % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_images(folder, n: int):
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:03d}.png").write_bytes(png(i))
    (folder / "notes.txt").write_text("not an image")
    return folder


class FakeEmbed:
    """Deterministic: the image's pixel colour as a vector, L2-normalised; counts its calls."""

    name = "fake-colour"

    def __init__(self):
        self.calls = 0

    def __call__(self, images: list[bytes]) -> torch.Tensor:
        self.calls += 1
        rows = [torch.tensor(load_rgb(b).getpixel((0, 0)), dtype=torch.float) for b in images]
        return torch.nn.functional.normalize(torch.stack(rows) + 1.0, dim=-1)


def test_pool_is_recursive_sorted_and_reads_list_files(tmp_path):
    make_images(tmp_path / "imgs", 6)
    pool = ImagePool(tmp_path / "imgs")
    assert pool.keys == sorted(pool.keys) and len(pool) == 6
    assert pool.keys[0] == "a/img001.png" and all(k.endswith(".png") for k in pool.keys)
    assert pool.read("b/img000.png") == png(0)
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/b/img002.png\n\nimgs/a/img003.png\n")
    listed = ImagePool(listing)
    assert listed.keys == ["imgs/b/img002.png", "imgs/a/img003.png"] and listed.read(listed.keys[1]) == png(3)
    with pytest.raises(FileNotFoundError):
        ImagePool(tmp_path / "missing")


def test_pool_reads_images_in_place_from_webdataset_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(3):
                for name, data in ((f"k{s}{i}.jpg", png(3 * s + i)), (f"k{s}{i}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pool = ImagePool(shards)
    assert len(pool) == 6 and pool.keys[0] == "shard-000000.tar/k00.jpg"
    assert [pool.read(k) for k in pool.keys] == [png(i) for i in range(6)]
    single = ImagePool(shards / "shard-000001.tar")
    assert single.keys == ["shard-000001.tar/k10.jpg", "shard-000001.tar/k11.jpg", "shard-000001.tar/k12.jpg"]
    assert pool.fingerprint() != single.fingerprint()
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(ValueError, match="bad.tar"):
        ImagePool(tmp_path / "bad.tar")


def test_neighbour_picks_fall_in_their_bands_deterministically_and_cache_is_reused(tmp_path):
    pool = ImagePool(make_images(tmp_path / "imgs", 60))
    embed = FakeEmbed()
    index = NeighbourIndex(pool, embed, embed.name, cache_dir=tmp_path / "cache", batch_size=16)
    assert embed.calls == 4 and index.embeddings.shape == (60, 3)
    for n, key in enumerate(pool.keys[:20]):
        ranked = index.ranked(key)
        assert key not in ranked and len(ranked) == 59
        positive, negative = index.pick(key, f"syn-0-{n}")
        assert positive in ranked[0:5] and negative in ranked[9:50]
        assert (positive, negative) == index.pick(key, f"syn-0-{n}")
    picks = {index.pick(pool.keys[0], f"seed-{n}") for n in range(30)}
    assert len({p for p, _ in picks}) > 1 and len({q for _, q in picks}) > 1  # the seed matters

    again = FakeEmbed()
    cached = NeighbourIndex(pool, again, again.name, cache_dir=tmp_path / "cache")
    assert again.calls == 0 and torch.equal(cached.embeddings, index.embeddings)
    other = FakeEmbed()
    NeighbourIndex(pool, other, "another-model", cache_dir=tmp_path / "cache")
    assert other.calls > 0  # another embedder name is another cache entry


def test_small_pool_clips_bands_and_select_images_follows_the_roles(tmp_path):
    pool = ImagePool(make_images(tmp_path / "imgs", 8))
    index = NeighbourIndex(pool, FakeEmbed(), "fake", positive_ranks=(1, 2), negative_ranks=(10, 50))
    ranked = index.ranked(pool.keys[0])
    positive, negative = index.pick(pool.keys[0], "x")
    assert positive in ranked[:2] and negative in ranked[2:]

    def planned(modality):
        return PlannedSample("syn-0-7", Task.RETRIEVAL, modality, "en")

    assert select_images(planned(Modality.IT2T), pool, index) == {"query": index.choose("syn-0-7")}
    both = select_images(planned(Modality.IT2I), pool, index)
    assert list(both) == ["query", "positive", "negative"] and len(set(both.values())) == 3
    text_query = select_images(planned(Modality.T2I), pool, index)
    assert list(text_query) == ["positive", "negative"] and text_query["positive"] == index.choose("syn-0-7")
    assert select_images(PlannedSample("s", Task.RETRIEVAL, Modality.T2IT, "en"), pool, index).keys() == {
        "positive", "negative"}


def test_default_encoder_embedder_on_a_tiny_model(tmp_path, tiny_mllama):
    pool = ImagePool(make_images(tmp_path / "imgs", 4))
    embed, name = encoder_embedder(tiny_mllama)
    index = NeighbourIndex(pool, embed, name, cache_dir=tmp_path / "cache", batch_size=2)
    assert index.embeddings.shape[0] == 4 and not index.embeddings.requires_grad
    assert torch.allclose(index.embeddings.norm(dim=-1), torch.ones(4), atol=1e-4)
    assert index.embed_calls == 2
    assert NeighbourIndex(pool, embed, name, cache_dir=tmp_path / "cache").embed_calls == 0


def test_an_unreadable_pool_image_is_left_out_not_fatal(tmp_path, caplog):
    make_images(tmp_path / "imgs", 8)
    (tmp_path / "imgs" / "a" / "img003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    pool = ImagePool(tmp_path / "imgs")
    bad = pool.index("a/img003.png")
    index = NeighbourIndex(pool, FakeEmbed(), "fake", tmp_path / "cache", batch_size=4,
                           positive_ranks=(1, 2), negative_ranks=(3, 5))
    assert index.unreadable == {bad} and "a/img003.png" in caplog.text
    assert all("a/img003.png" not in index.ranked(key) for key in pool.keys if key != "a/img003.png")
    assert all(index.choose(f"syn-{i}") != "a/img003.png" for i in range(50))
    cached = NeighbourIndex(pool, FakeEmbed(), "fake", tmp_path / "cache")  # from the cache, same view
    assert cached.unreadable == {bad} and cached.embed_calls == 0
