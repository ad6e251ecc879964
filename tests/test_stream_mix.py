"""StreamDataset over several streams mixed by weight: exactly once, interleaving, exact resume, errors."""

from __future__ import annotations

import pytest

import hf_loop as hl
from hf_loop.stream.protocol import Kind, ReaderPosition
from tests.test_stream import hf_stream, ids_of, simulate, unsized_stream, write_shards


@pytest.fixture(scope="module")
def mix_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return write_shards(root / "a", [30, 25, 20]), write_shards(root / "b", [60, 45], first_id=1000)


def test_mixed_streams_read_every_example_once_and_interleave_by_weight(mix_sets):
    a, b = mix_sets
    everything = list(range(75)) + list(range(1000, 1105))
    for world_size, num_workers in ((1, 0), (2, 1), (1, 3), (2, 2)):
        stream = hl.StreamDataset([hf_stream(a), hf_stream(b)], weights=[1, 3], shuffle_buffer=20, seed=0)
        got = simulate(stream, world_size, num_workers, batch_size=4)
        assert sorted(i for v in got.values() for ids, _ in v for i in ids) == everything
    stream = hl.StreamDataset([hf_stream(a), hf_stream(b)], weights=[1, 3], shuffle_buffer=40, seed=0)
    first = [i for ids, _ in simulate(stream, 1, 0, batch_size=4)[(0, 0)][:20] for i in ids]  # 2 windows
    share_a = sum(i < 1000 for i in first) / len(first)
    assert 0.1 < share_a < 0.4  # weight 1 of 4 while both sources last (a seeded draw, not a random test)
    plan = stream.plan(num_workers=2)
    assert "mix source 0 (weight 0.25)" in str(plan) and "mix source 1 (weight 0.75)" in str(plan)
    assert sum(r.examples for r in plan.readers) == 180


def test_mixed_streams_resume_exactly_with_workers(mix_sets):
    a, b = mix_sets

    def build():
        stream = hl.StreamDataset(
            [hf_stream(a), hf_stream(b)], weights=[0.4, 0.6], shuffle_buffer=16, seed=3, bucket="input_ids"
        )
        return hl.make_loader(stream, batch_size=4, num_workers=2, collate_fn=hl.PadCollator())

    full = [batch["id"].tolist() for batch in build()]
    for cut in (3, 17, len(full) - 1):
        loader = build()
        iterator = iter(loader)
        for _ in range(cut):
            next(iterator)
        resumed = build()
        resumed.load_state_dict(loader.state_dict())
        assert [batch["id"].tolist() for batch in resumed] == full[cut:], cut
    state = build().state_dict(consumed=0)
    state["plan"]["weights"] = [0.5, 0.5]
    with pytest.raises(ValueError, match=r"weights: saved \[0.5, 0.5\], now \[0.4, 0.6\]"):
        build().load_state_dict(state)


def test_every_recorded_position_restarts_a_mixed_reader_exactly(mix_sets):
    a, b = mix_sets
    stream = hl.StreamDataset([hf_stream(a), hf_stream(b)], weights=[2, 1], shuffle_buffer=12, seed=1)
    bound = stream.bind(batch_size=4, num_workers=2)
    for local in range(2):
        items = [(ids_of(rows), meta) for rows, meta in bound._batches(local, 0)]
        for k, (_, meta) in enumerate(items):
            if meta.kind != Kind.TAIL:
                position = ReaderPosition.from_flat(meta.position)
                again = [ids_of(rows) for rows, _ in bound._batches(local, 0, position)]
                assert again == [ids for ids, _ in items[k + 1 :]], (local, k)


def test_mixing_errors(mix_sets, tmp_path):
    a, b = mix_sets
    with pytest.raises(ValueError, match=r"weights must be 2 positive numbers.*got \[1, 0\].*never be read"):
        hl.StreamDataset([hf_stream(a), hf_stream(b)], weights=[1, 0])
    with pytest.raises(ValueError, match="weights must be 2 positive numbers"):
        hl.StreamDataset([hf_stream(a), hf_stream(b)], weights=[1, 2, 3])
    with pytest.raises(ValueError, match=r"pass them as a list: StreamDataset\(\[a, b\]"):
        hl.StreamDataset(hf_stream(a), weights=[1.0])
    with pytest.raises(ValueError, match=r"needs a stream, or a non-empty list"):
        hl.StreamDataset([])
    with pytest.raises(hl.DataError, match=r"need the same columns.*\['id'\]"):
        hl.StreamDataset([hf_stream(a), hf_stream(b).select_columns(["id"])])
    tiny = hl.StreamDataset(
        [hf_stream(a), unsized_stream(write_shards(tmp_path, [3], first_id=500))]
    )  # 1 row group of unknown size
    with pytest.raises(hl.DataError, match=r"mix source 1: the stream has 1 shard\(s\)"):
        tiny.bind(batch_size=2, num_workers=2)


def test_stream_datasets_mix_like_the_streams_they_wrap(mix_sets):
    # README: hl.StreamDataset([stream_a, stream_b], weights=...) with StreamDataset items
    a, b = mix_sets
    plain = hl.StreamDataset([hf_stream(a), hf_stream(b)], weights=[1, 3], shuffle_buffer=20, seed=0)
    wrapped = hl.StreamDataset(
        [hl.StreamDataset(hf_stream(a)), hl.StreamDataset(hf_stream(b))],
        weights=[1, 3],
        shuffle_buffer=20,
        seed=0,
    )
    assert simulate(wrapped, 2, 1, batch_size=4) == simulate(plain, 2, 1, batch_size=4)
    same_options = hl.StreamDataset(
        [hl.StreamDataset(hf_stream(a), shuffle_buffer=20), hf_stream(b)], weights=[1, 3], shuffle_buffer=20
    )
    assert len(same_options.sources) == 2
    with pytest.raises(
        ValueError, match=r"item 0 is a StreamDataset built with its own .*options.*weights=\.\.\."
    ):
        hl.StreamDataset([hl.StreamDataset(hf_stream(a), transform=lambda x: x), hf_stream(b)])
    with pytest.raises(ValueError, match="item 1 is itself a weighted mix"):
        hl.StreamDataset([hf_stream(a), plain])
