"""hl.load: Hub-layout folders, builders, save_to_disk folders, the offline cache, and every DataError."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest

import hf_loop as hl
from hf_loop.hub import cached_configs


def test_loads_hub_folder_by_path_all_splits(hub_folder):
    dd = hl.load(hub_folder)
    assert isinstance(dd, datasets.DatasetDict)
    assert {k: v.num_rows for k, v in dd.items()} == {"train": 60, "test": 20}
    assert dd["train"].column_names == ["text", "label"]


def test_loads_split_and_config(hub_folder):
    assert hl.load(str(hub_folder), split="test").num_rows == 20
    small = hl.load(hub_folder, "small", split="train")
    assert small.num_rows == 10
    assert hl.load(hub_folder, split="train[:7]").num_rows == 7


def test_streaming_reads_every_row_from_the_shards(hub_folder):
    stream = hl.load(hub_folder, split="train", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert stream.num_shards == 2
    rows = list(stream)
    assert len(rows) == 60
    assert rows[0]["text"] == hl.load(hub_folder, split="train")[0]["text"]


def test_builder_name_with_data_files_and_single_file(hub_folder):
    ds = hl.load("parquet", data_files={"train": str(hub_folder / "data" / "train-*.parquet")}, split="train")
    assert ds.num_rows == 60
    one = hl.load(hub_folder / "small" / "train-00000-of-00001.parquet", split="train")
    assert one.num_rows == 10


def test_save_to_disk_folder_loads_map_style_and_streaming(hub_folder, tmp_path):
    hl.load(hub_folder).save_to_disk(str(tmp_path / "saved"))
    assert hl.load(tmp_path / "saved", split="train").num_rows == 60
    stream = hl.load(tmp_path / "saved", split="test", streaming=True)
    assert sum(1 for _ in stream) == 20
    with pytest.raises(hl.DataError, match=r"unknown split 'dev'.*available splits are \['train', 'test'\]"):
        hl.load(tmp_path / "saved", split="dev")


def test_unknown_split_lists_splits(hub_folder):
    with pytest.raises(
        hl.DataError, match=r"unknown split 'validation'; available splits: \['train', 'test'\]"
    ):
        hl.load(hub_folder, split="validation")
    with pytest.raises(hl.DataError, match=r"unknown split 'test'; available splits: \['train'\]"):
        hl.load(hub_folder, "small", split="test", streaming=True)


def test_unknown_config_lists_configs(hub_folder):
    with pytest.raises(
        hl.DataError, match=r"unknown config 'large'; available configs: \['default', 'small'\]"
    ):
        hl.load(hub_folder, "large")
    assert isinstance(hl.DataError("x"), ValueError)


def test_missing_local_path(tmp_path):
    with pytest.raises(hl.DataError, match=r"no dataset at .*nowhere.*does not exist.*Fix: check the path"):
        hl.load(tmp_path / "nowhere")
    with pytest.raises(hl.DataError, match=r"no dataset at './not_here/data.parquet'"):
        hl.load("./not_here/data.parquet")


def test_unknown_hub_id_offline_and_not_cached(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: what datasets raises is a ConnectionError(OfflineModeIsEnabled).
    with pytest.raises(
        hl.DataError, match=r"'someorg/missing'.*offline mode is on.*not in the datasets cache.*Fix"
    ):
        hl.load("someorg/missing", cache_dir=str(tmp_path / "cache"))


def _fake_hub_cache(hub_folder: Path, cache: Path) -> Path:
    """Write what datasets leaves in its cache after loading Hub dataset 'org/name' online (its layout)."""
    src = cache.parent / "prepared"
    for config in ("default", "small"):
        datasets.load_dataset(str(hub_folder), config, cache_dir=str(src))
    dst = cache / "org___name"
    shutil.copytree(src / hub_folder.name, dst)
    for arrow in dst.rglob(f"{hub_folder.name}-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace(f"{hub_folder.name}-", "name-")))
    return cache


def test_offline_cached_hub_dataset_loads_and_lists_cached_configs(hub_folder, tmp_path):
    cache = str(_fake_hub_cache(hub_folder, tmp_path / "cache"))
    assert cached_configs("org/name", cache) == ["default", "small"]
    # datasets refuses a cache with several configs when none is named; hl.load takes 'default' as online does.
    dd = hl.load("org/name", cache_dir=cache)
    assert dd["train"].num_rows == 60
    assert hl.load("org/name", "small", split="train", cache_dir=cache).num_rows == 10
    assert sum(1 for _ in hl.load("org/name", split="test", streaming=True, cache_dir=cache)) == 20
    with pytest.raises(
        hl.DataError, match=r"config 'big' is not in the cache; cached configs: \['default', 'small'\]"
    ):
        hl.load("org/name", "big", cache_dir=cache)
    with pytest.raises(hl.DataError, match=r"unknown split 'dev'; available splits: \['train', 'test'\]"):
        hl.load("org/name", split="dev", cache_dir=cache)
    # a typo offline: the message shows what the cache does hold
    with pytest.raises(
        hl.DataError, match=r"'org/nmae'.*not in the datasets cache \(cached Hub datasets: \['org/name'\]\)"
    ):
        hl.load("org/nmae", cache_dir=cache)


def test_trust_remote_code_is_refused(hub_folder):
    with pytest.raises(hl.DataError, match=r"never runs code.*trust_remote_code=True.*refs/convert/parquet"):
        hl.load(hub_folder, trust_remote_code=True)


def test_loading_script_suggests_parquet(tmp_path):
    folder = tmp_path / "scripted"
    folder.mkdir()
    (folder / "scripted.py").write_text("import datasets\n")
    with pytest.raises(
        hl.DataError, match=r"loading script \(scripted.py\).*never runs remote code.*Parquet"
    ):
        hl.load(folder)


def test_builder_without_files_and_empty_glob(tmp_path):
    with pytest.raises(hl.DataError, match=r"builder 'csv' needs data_files="):
        hl.load("csv")
    with pytest.raises(hl.DataError, match=r"no file matches data_files="):
        hl.load("parquet", data_files=str(tmp_path / "*.parquet"))
    odd = tmp_path / "data.weird"
    odd.write_text("x")
    with pytest.raises(hl.DataError, match=r"unknown extension '.weird'"):
        hl.load(odd)


def test_data_that_cannot_be_read_is_a_data_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "nothing").mkdir()
    with pytest.raises(
        hl.DataError, match=r"the folder '.*nothing' holds no data files.*Fix: put the data files"
    ):
        hl.load(str(tmp_path / "nothing"))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(hl.DataError, match=r"could not read the data \(an empty file\?\): ArrowInvalid"):
        hl.load(str(empty), split="train")
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    with pytest.raises(hl.DataError, match=r"split 'train' selects no rows.*Fix: check the data has rows"):
        hl.load(str(header), split="train")
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\na,1\nb,0\n")
    with pytest.raises(
        hl.DataError, match=r"split 'train\[:abc\]' is not datasets' split syntax.*'train\[:100\]'"
    ):
        hl.load(str(rows), split="train[:abc]")
