"""Load a dataset by Hub id, local folder, data file or builder name, with errors that say how to fix them.

``load`` is a thin wrapper around :func:`datasets.load_dataset`. It adds three things: it never runs remote code,
it also opens folders written by ``save_to_disk`` and single data files, and it turns the errors users meet most
(offline and not cached, unknown split or config, missing path, loading scripts) into :class:`DataError` messages
that name what was asked, what exists, and the one-line fix.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError
from datasets.naming import camelcase_to_snakecase
from datasets.packaged_modules import _EXTENSION_TO_MODULE, _PACKAGED_DATASETS_MODULES

from hf_loop.errors import DataError

__all__ = ["DataError", "cached_configs", "cached_datasets", "load"]

_PARQUET_BRANCH = "refs/convert/parquet"


def load(
    path: str | os.PathLike[str],
    name: str | None = None,
    *,
    split: str | None = None,
    streaming: bool = False,
    revision: str | None = None,
    data_files: Any = None,
    **load_kwargs: Any,
) -> datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict | datasets.IterableDatasetDict:
    """Load a dataset as :func:`datasets.load_dataset` would, without remote code and with actionable errors.

    Args:
        path: a Hub id (``"org/name"``), a local folder in Hub layout (data files, optionally a README.md with a
            ``configs:`` block), a folder written by ``save_to_disk``, a single data file (``.parquet``, ``.csv``,
            ``.json``/``.jsonl``, ``.txt``, ``.arrow``), or a builder name (``"parquet"``, ``"csv"``, ...) together
            with ``data_files``.
        name: the configuration (subset) to load.
        split: a split name (``"train"``) or datasets' split syntax (``"train[:10%]"``); None returns every split.
        streaming: return an ``IterableDataset`` that reads lazily instead of preparing Arrow files.
        revision: a Hub branch, tag or commit. ``"refs/convert/parquet"`` is the Hub's Parquet conversion, which
            loads datasets whose loading script no longer runs.
        data_files: files or glob patterns (a string, list, or dict split -> files).
        **load_kwargs: passed to :func:`datasets.load_dataset` (``cache_dir``, ``features``, ...). Passing
            ``trust_remote_code`` is an error: hf_loop never runs code from a dataset repository.

    Returns:
        A ``Dataset`` or ``IterableDataset`` when ``split`` is given, else a ``DatasetDict`` /
        ``IterableDatasetDict``.

    Raises:
        DataError: offline and not cached, unknown split or config, missing path or Hub id, a repository that
            only has a loading script, a folder without data files, data that cannot be read (an empty file),
            a split that selects no rows or is not split syntax, or ``trust_remote_code`` in ``load_kwargs``.

    Example:
        >>> train = load("stanfordnlp/imdb", split="train")                # a Hub id (downloaded, or cached)
        >>> stream = load("./my_data", split="train", streaming=True)      # a local folder in Hub layout
        >>> ds = load("parquet", data_files={"train": "data/*.parquet"})   # a builder and its data files
        >>> type(train).__name__, type(stream).__name__, list(ds)
        ('Dataset', 'IterableDataset', ['train'])
    """
    if "trust_remote_code" in load_kwargs:
        raise DataError(
            f"hl.load never runs code from a dataset repository, got trust_remote_code="
            f"{load_kwargs['trust_remote_code']!r}. datasets >= 4 removed loading scripts; load the data files "
            f"instead: revision={_PARQUET_BRANCH!r} (the Hub's Parquet conversion), data_files=..., or a local "
            "path. Remove trust_remote_code from the call."
        )
    path = os.fspath(path)
    local = Path(path).expanduser()
    if local.is_dir() and _is_saved_to_disk(local):
        return _load_from_disk(local, split=split, streaming=streaming)
    if local.is_file():
        builder = _builder_for_file(local)
        if data_files is not None:
            raise DataError(
                f"got both a data file path={path!r} and data_files={data_files!r}; pass one of them"
            )
        path, data_files = builder, str(local)
    elif not local.exists() and path not in _PACKAGED_DATASETS_MODULES and _looks_local(path):
        raise DataError(
            f"no dataset at {path!r}: the path does not exist (resolved to {local.absolute()}). Fix: check the "
            "path, or pass a Hub id as 'org/name'."
        )
    elif path in _PACKAGED_DATASETS_MODULES and data_files is None and "data_dir" not in load_kwargs:
        raise DataError(
            f"builder {path!r} needs data_files=... (a file, a glob such as 'data/*.{path}', or a dict "
            "split -> files), or data_dir=..."
        )
    asked = _describe(path, name, split, revision, data_files)
    kwargs = dict(load_kwargs, split=split, streaming=streaming, revision=revision, data_files=data_files)
    try:
        return datasets.load_dataset(path, name, **kwargs)
    except Exception as error:
        retry = _default_config_retry(error, path, name)
        if retry is not None:
            try:
                return datasets.load_dataset(path, retry, **kwargs)
            except Exception as second:
                error = second
                name = retry
        data_error = _translate(error, path, name, split, revision, data_files, load_kwargs, asked)
        if data_error is None:
            raise
        raise data_error from error


def _looks_local(path: str) -> bool:
    """A string the user meant as a file system path, not a Hub id (which is 'name' or 'org/name')."""
    return (
        os.path.isabs(path)
        or path.startswith(("./", "../", "~", ".\\"))
        or path.count("/") > 1
        or os.sep in path.replace("/", "")
        or Path(path).suffix.lower() in _EXTENSION_TO_MODULE
    )


def _builder_for_file(file: Path) -> str:
    suffix = file.suffix.lower()
    builder = _EXTENSION_TO_MODULE.get(suffix, (None,))[0]
    if builder is None:
        known = [".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl", ".txt"]
        raise DataError(
            f"cannot tell how to read {str(file)!r}: unknown extension {suffix!r}; known: {known}"
        )
    return builder


def _is_saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_from_disk(folder: Path, *, split: str | None, streaming: bool) -> Any:
    """A ``save_to_disk`` folder: the 'materialize once, train offline' form (no Hub, no cache keys)."""
    ds = datasets.load_from_disk(str(folder))
    if split is not None:
        if not isinstance(ds, datasets.DatasetDict):
            raise DataError(
                f"{str(folder)!r} holds a single saved Dataset (no splits), got split={split!r}. Fix: drop split=."
            )
        if split not in ds:
            raise DataError(
                f"unknown split {split!r} in {str(folder)!r}: available splits are {list(ds)}. Fix: "
                f"split={next(iter(ds))!r}."
            )
        ds = ds[split]
    if not streaming:
        return ds

    def stream(d: datasets.Dataset) -> datasets.IterableDataset:
        # One shard per Arrow file, so readers (ranks x workers) can split the stream without re-sharding.
        return d.to_iterable_dataset(num_shards=max(1, len(d.cache_files)))

    if isinstance(ds, datasets.DatasetDict):
        return datasets.IterableDatasetDict({k: stream(v) for k, v in ds.items()})
    return stream(ds)


def _describe(path: str, name: str | None, split: str | None, revision: str | None, data_files: Any) -> str:
    parts = [repr(path)]
    for key, value in (("name", name), ("split", split), ("revision", revision), ("data_files", data_files)):
        if value is not None:
            parts.append(f"{key}={value!r}")
    return "hl.load(" + ", ".join(parts) + ")"


def _offline() -> bool:
    return bool(datasets.config.HF_HUB_OFFLINE)


def _cache_root(path: str, load_kwargs: dict[str, Any]) -> Path:
    """Where datasets keeps the prepared Arrow files of Hub dataset ``path`` (its cache layout, not ours)."""
    cache_dir = Path(
        os.path.expanduser(str(load_kwargs.get("cache_dir") or datasets.config.HF_DATASETS_CACHE))
    )
    parts = path.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    return cache_dir / "___".join(parts)


def cached_configs(path: str, cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Configurations of Hub dataset ``path`` that the local datasets cache holds (what loads offline).

    Example:
        >>> cached_configs("stanfordnlp/imdb")      # needs the Hub: a dataset downloaded once  # doctest: +SKIP
        ['plain_text']
    """
    root = _cache_root(path, {"cache_dir": cache_dir})
    return sorted({Path(p).parts[-3] for p in glob.glob(str(root / "*" / "*" / "*")) if os.path.isdir(p)})


def cached_datasets(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Hub datasets (``org/name``) the local datasets cache holds prepared data for.

    Example:
        >>> cached_datasets()                       # needs the Hub: a dataset downloaded once  # doctest: +SKIP
        ['stanfordnlp/imdb']
    """
    root = Path(os.path.expanduser(str(cache_dir or datasets.config.HF_DATASETS_CACHE)))
    if not root.is_dir():
        return []
    return sorted(p.name.replace("___", "/") for p in root.iterdir() if p.is_dir() and "___" in p.name)


def _default_config_retry(error: Exception, path: str, name: str | None) -> str | None:
    """Offline, datasets refuses a cache holding several configs even when one is 'default' (datasets#6667)."""
    if name is None and "multiple" in str(error) and "configurations in the cache" in str(error):
        found = re.search(r"in the cache: ([^\n]*)", str(error))
        if found and "default" in [c.strip() for c in found.group(1).split(",")]:
            return "default"
    return None


def _translate(
    error: Exception,
    path: str,
    name: str | None,
    split: str | None,
    revision: str | None,
    data_files: Any,
    load_kwargs: dict[str, Any],
    asked: str,
) -> DataError | None:
    """The DataError for an error datasets raised, or None when it is not a data problem we can explain."""
    text = str(error)
    if isinstance(error, RuntimeError) and "scripts are no longer supported" in text:
        script = text.rsplit(" ", 1)[-1]
        if Path(path).expanduser().exists():
            fix = "convert it to Parquet files (README.md `configs:` block optional) or pass data_files=..."
        else:
            fix = (
                f"hl.load({path!r}, revision={_PARQUET_BRANCH!r}) (the Hub's automatic Parquet conversion), "
                "hl.load('parquet', data_files=...) with its files, or a Parquet mirror of the dataset"
            )
        return DataError(
            f"{asked}: the dataset is defined by a loading script ({script}); datasets >= 4 no longer runs "
            f"scripts and hf_loop never runs remote code. Fix: {fix}."
        )
    if isinstance(error, ConnectionError) or (isinstance(error, OSError) and "OfflineModeIsEnabled" in text):
        configs = cached_configs(path, load_kwargs.get("cache_dir"))
        why = (
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
            if _offline()
            else "the Hub is unreachable"
        )
        others = cached_datasets(load_kwargs.get("cache_dir"))[:10]
        have = (
            f"the cache holds configs {configs}"
            if configs
            else "it is not in the datasets cache" + (f" (cached Hub datasets: {others})" if others else "")
        )
        return DataError(
            f"{asked}: {why} and {have} ({_cache_root(path, load_kwargs)}). Fix: run the same hl.load once "
            "with network access (it fills the cache), or save it with ds.save_to_disk(folder) on a machine "
            "that has it and hl.load(folder) here; unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when online."
        )
    if isinstance(error, DatasetNotFoundError):
        if "Revision" in text:
            return DataError(
                f"{asked}: revision {revision!r} does not exist. Fix: use a branch, tag or commit of it."
            )
        return DataError(
            f"{asked}: no such dataset on the Hub, or it is private/gated ({text}). Fix: check the id "
            "('org/name'), log in with `hf auth login` for private or gated data, or pass a local path."
        )
    if isinstance(error, FileNotFoundError) and "Couldn't find any data file" in text:
        return DataError(
            f"{asked}: no dataset at {path!r} - no local folder and no Hub dataset of that name."
        )
    if type(error).__name__ == "EmptyDatasetError":
        return DataError(
            f"{asked}: the folder {path!r} holds no data files (looked for .parquet, .csv, .json/.jsonl, .txt, "
            ".arrow, and a README.md `configs:` block). Fix: put the data files there, or point at the folder or "
            "file that has them."
        )
    if type(error).__name__ == "DatasetGenerationError":
        cause = error.__cause__ or error.__context__
        why = f"{type(cause).__name__}: {cause}" if cause is not None else text
        empty = "BatchSize must be greater than 0" in why or "empty" in why.lower()
        hint = " (an empty file?)" if empty else ""
        return DataError(
            f"{asked}: datasets could not read the data{hint}: {why.splitlines()[0] if why else why}. Fix: check "
            "that every data file has rows and the same columns, or pass only the good ones with data_files=..."
        )
    if not isinstance(error, ValueError):
        return None
    if "corresponds to no data" in text:
        return DataError(
            f"{asked}: split {split!r} selects no rows (the data is empty, or the slice is past its end). Fix: "
            "check the data has rows, or use a slice within them, e.g. 'train[:80%]'."
        )
    if "Unrecognized instruction format" in text:
        return DataError(
            f"{asked}: split {split!r} is not datasets' split syntax. Fix: a split name such as 'train', or a "
            "slice such as 'train[:100]', 'train[10%:50%]' or 'train[:80%]+validation'."
        )
    if "Unknown split" in text or "Bad split" in text:
        splits = _splits(path, name, revision, data_files, load_kwargs) or _listed(text)
        fix = f" Fix: split={splits[0]!r}." if splits else ""
        return DataError(f"{asked}: unknown split {split!r}; available splits: {splits}.{fix}")
    if ("BuilderConfig" in text and "not found" in text) or "Config name is missing" in text:
        configs = _configs(path, revision, data_files, load_kwargs) or _listed(text)
        what = f"unknown config {name!r}" if name is not None else "the dataset has several configs; pick one"
        fix = f" Fix: hl.load({path!r}, {configs[0]!r})." if configs else ""
        return DataError(f"{asked}: {what}; available configs: {configs}.{fix}")
    if "Couldn't find cache for" in text or "configurations in the cache" in text:
        configs = cached_configs(path, load_kwargs.get("cache_dir"))
        what = f"config {name!r} is not in the cache" if name is not None else "several configs are cached"
        fix = f" Fix: hl.load({path!r}, {configs[0]!r}), or load it once online." if configs else ""
        return DataError(f"{asked}: offline, and {what}; cached configs: {configs}.{fix}")
    if "valid data file" in text:
        return DataError(
            f"{asked}: no file matches data_files={data_files!r}. Fix: check the paths or globs."
        )
    return None


def _listed(text: str) -> list[str]:
    """The list datasets printed in its own message (a fallback when asking again fails)."""
    found = re.search(r"\[([^\]]*)\]", text)
    return re.findall(r"'([^']*)'", found.group(1)) if found else []


def _configs(path: str, revision: str | None, data_files: Any, load_kwargs: dict[str, Any]) -> list[str]:
    try:
        return list(datasets.get_dataset_config_names(path, revision=revision, data_files=data_files))
    except Exception:
        return []


def _splits(
    path: str, name: str | None, revision: str | None, data_files: Any, load_kwargs: dict[str, Any]
) -> list[str]:
    try:
        return list(
            datasets.get_dataset_split_names(
                path, name, revision=revision, data_files=data_files, cache_dir=load_kwargs.get("cache_dir")
            )
        )
    except Exception:
        return []
