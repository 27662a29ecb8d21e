import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import image_bytes

from mme5.eval.encode import EmbeddingCache, encode, item_key
from mme5.eval.images import ImageRef, ImageStore
from mme5.eval.retrieval import SetBuilder


def fake_embed(items):
    """Deterministic embeddings from the text and the image's first pixel (no model)."""
    rows = []
    for item in items:
        text = (item.instruction or "") + (item.text or "")
        red = item.image.getpixel((0, 0))[0] if item.image is not None else -1
        rows.append([len(text), sum(map(ord, text)) % 97, red, 1.0])
    return torch.tensor(rows)


class Counting:
    """Wraps an embed function; counts calls and items; can fail after `fail_after` calls."""

    def __init__(self, fail_after=None):
        self.calls, self.items, self.fail_after = 0, [], fail_after

    def __call__(self, items):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.items += items
        return fake_embed(items)


def make_items(root, n_images=6, n_texts=20, write=True):
    """Distinct items (texts of varied length, and images) through a SetBuilder, with repeats interned."""
    for i in range(n_images if write else 0):
        (root / f"{i}.png").write_bytes(image_bytes((40 * i, 10, 10)))
    builder = SetBuilder("unit", ImageStore([root]))
    rows = [builder.item("Represent", f"text {'x' * (i % 7)} {i}", None, "t") for i in range(n_texts)]
    rows += [builder.item("Represent the given image.", None, f"{i}.png", "i") for i in range(n_images)]
    rows += [builder.item("Represent", "text  0", None, "again"), builder.item("", None, "0.png", "again")]
    return builder.items, rows


def test_each_distinct_item_is_embedded_once_in_batches(tmp_path):
    items, rows = make_items(tmp_path)
    assert len(items) == 20 + 6 + 1 and len(rows) == 28  # "", 0.png is a new item; "text  0" is not
    embed = Counting()
    out = encode(items, embed, batch_size=4)
    assert embed.calls == 7 and len(embed.items) == len(items)
    torch.testing.assert_close(out, fake_embed([_loaded(it) for it in items]))


def ident(item):
    return item.instruction, item.text, item.image and item.image.getpixel((0, 0))


def _loaded(spec):
    from mme5.backbones import Item
    from mme5.eval.images import load_image

    return Item(spec.instruction, spec.text, spec.image and load_image(spec.image))


def test_cache_second_run_embeds_nothing_and_interrupted_run_resumes(tmp_path):
    items, _ = make_items(tmp_path)
    cache = EmbeddingCache(tmp_path / "cache", "model-a")
    expected = encode(items, Counting(), batch_size=4)

    interrupted = Counting(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        encode(items, interrupted, batch_size=4, cache=cache, namespace="set", flush_every=1000)
    assert len(interrupted.items) == 12  # 3 batches done, saved on the way out

    resumed = Counting()
    torch.testing.assert_close(encode(items, resumed, batch_size=4, cache=cache, namespace="set"), expected)
    assert len(resumed.items) == len(items) - 12
    assert {ident(i) for i in resumed.items}.isdisjoint({ident(i) for i in interrupted.items})

    again = Counting()
    torch.testing.assert_close(encode(items, again, batch_size=4, cache=cache, namespace="set"), expected)
    assert again.calls == 0
    other_model = Counting()
    encode(items, other_model, batch_size=4, cache=EmbeddingCache(tmp_path / "cache", "b"), namespace="set")
    assert len(other_model.items) == len(items)


def test_item_key_changes_with_any_field():
    from mme5.eval.retrieval import ItemSpec

    base = ItemSpec("instr", "text", ImageRef(None, "/a.png", "stat:10:1"))
    variants = [ItemSpec("instr2", "text", base.image), ItemSpec("instr", "text2", base.image),
                ItemSpec("instr", "text", ImageRef(None, "/b.png", "stat:10:1")),
                ItemSpec("instr", "text", ImageRef(None, "/a.png", "stat:10:2")),  # same size, rewritten
                ItemSpec("instr", "text", ImageRef("/z.zip", "/a.png", "stat:10:1")),
                ItemSpec("instr", "text"), ItemSpec("instr", "text", base.image, prompt="instr text\n")]
    keys = {item_key(v) for v in variants}
    assert len(keys) == len(variants) and item_key(base) not in keys
    assert item_key(ItemSpec("instr", "text", ImageRef(None, "/a.png", "stat:10:1"))) == item_key(base)


def test_flush_every_writes_parts_while_running(tmp_path):
    items, _ = make_items(tmp_path)
    cache = EmbeddingCache(tmp_path / "cache", "m")
    encode(items, Counting(), batch_size=4, cache=cache, namespace="a/b", flush_every=8)
    parts = list((tmp_path / "cache" / "m" / "a__b").glob("part-*.pt"))
    assert len(parts) == 4  # 8 + 8 + 8 + the last 3
    assert not list((tmp_path / "cache" / "m" / "a__b").glob(".*.tmp"))


def _worker(rank, world_size, init_file, root, cache_root, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        items, _ = make_items(root, write=False)  # the parent wrote the images
        embed = Counting()
        out = encode(items, embed, batch_size=3, cache=EmbeddingCache(cache_root, "m"), namespace="ns")
        again = Counting()
        encode(items, again, batch_size=3, cache=EmbeddingCache(cache_root, "m"), namespace="ns")
        torch.save((out, [ident(i) for i in embed.items], again.calls), results / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_encode_disjoint_shares_and_equal_one_process(tmp_path):
    items, _ = make_items(tmp_path)
    single = encode(items, Counting(), batch_size=3)
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, results / "init", tmp_path, tmp_path / "cache", results), nprocs=2, join=True)
    (out0, share0, again0), (out1, share1, again1) = (torch.load(results / f"{r}.pt") for r in (0, 1))
    torch.testing.assert_close(out0, single)
    torch.testing.assert_close(out1, single)
    assert share0 and share1 and len(set(share0) | set(share1)) == len(share0) + len(share1) == len(items)
    assert again0 == again1 == 0  # both ranks' parts are read back


def test_an_image_rewritten_with_other_content_of_the_same_size_is_encoded_again(tmp_path):
    items, _ = make_items(tmp_path)
    cache = EmbeddingCache(tmp_path / "cache", "m")
    first = encode(items, fake_embed, batch_size=4, cache=cache, namespace="set")
    red, blue = image_bytes((200, 10, 10)), image_bytes((10, 10, 200))
    assert len(red) == len(blue)
    (tmp_path / "3.png").write_bytes(red)
    os.utime(tmp_path / "3.png", ns=(1, 1))
    again_items, _ = make_items(tmp_path, write=False)
    counting = Counting()
    encode(again_items, counting, batch_size=4, cache=cache, namespace="set")
    assert [item.image.getpixel((0, 0)) for item in counting.items] == [(200, 10, 10)]
    (tmp_path / "3.png").write_bytes(blue)  # same size, new content (and a new modification time)
    later_items, _ = make_items(tmp_path, write=False)
    counting = Counting()
    later = encode(later_items, counting, batch_size=4, cache=cache, namespace="set")
    assert [item.image.getpixel((0, 0)) for item in counting.items] == [(10, 10, 200)]
    assert not torch.equal(later, first)


SLOW_EVAL = """
import os, sys, time
from mme5.encoder import Encoder

def slow(self, items, *args, **kwargs):  # says when each batch is done, and leaves time for a kill
    out = embed(self, items, *args, **kwargs)
    if items:
        print("batch", flush=True)
        time.sleep(float(os.environ.get("PAUSE", "0")))
    return out

embed, Encoder.embed = Encoder.embed, slow
from mme5.eval.__main__ import main
main(sys.argv[1:])
"""


def test_sigterm_mid_encoding_keeps_what_was_encoded_and_exits_143(tmp_path, tiny_world, demo_backbone):
    """`kill` (SIGTERM) of `python -m mme5.eval`: the batches encoded since the last cache part are written
    on the way out (not lost with the process), the lock is freed, and the rerun encodes only the rest."""
    import subprocess
    import sys

    def command(out):
        return [sys.executable, "-c", SLOW_EVAL, "--model", demo_backbone, "--benchmark", "mmeb", "--mmeb",
                str(tiny_world / "mmeb"), "--out", str(out), "--batch-size", "2"]

    def run(out):  # at full speed
        done = subprocess.run(command(out), capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.count("batch")

    env = os.environ | {"PYTHONPATH": os.getcwd()}
    out = tmp_path / "eval"
    child = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env | {"PAUSE": "0.2"})
    for _ in range(3):
        assert child.stdout.readline() == "batch\n", child.stderr.read()
    child.send_signal(15)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 143, stderr[-2000:]
    kept = list((out / "cache").rglob("part-*.pt"))
    # the third batch's call was still running (its sleep) when the signal came: two batches of 2 are kept
    assert kept and sum(len(torch.load(p, weights_only=True)["keys"]) for p in kept) >= 2 * 2
    assert not (out / "scores.json").exists()

    straight = tmp_path / "straight"
    rest, every = run(out), run(straight)
    assert rest <= every - 2
    resumed, uninterrupted = (json.loads((f / "scores.json").read_text())["mmeb"] for f in (out, straight))
    assert resumed["Overall"] == uninterrupted["Overall"]
