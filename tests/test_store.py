"""checkpoint/store.py (with layout.py, pending.py, lock.py): step folders written atomically with a manifest,
checksums taken while writing, verified reads, fallback past damaged checkpoints, prune, the out_dir lock, a
full disk, and the 2-rank protocol.

Cases ported from peers: torchtitan's checkpoint tests (keep the latest k; only rank 0 purges; the newest
complete step wins; a step folder without its metadata, non-canonical names and unrelated folders are not
checkpoints; step 0 is valid; no folder means a fresh start) and torch.distributed.checkpoint's failure tests
(a write failing on one rank raises on every rank and names it; a read failing on one rank fails them all).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from datetime import datetime
from pathlib import Path

import pytest
import torch
from distributed import run_distributed

import hf_loop as hl
from hf_loop.checkpoint import layout, lock, store
from hf_loop.checkpoint.layout import CorruptCheckpoint, Manifest, step_folder
from hf_loop.checkpoint.lock import OutDirLock
from hf_loop.checkpoint.store import candidates, load_newest, prune, read, write
from hf_loop.dist import barrier

ENV = hl.DistEnv()
ROOT = Path(__file__).resolve().parent.parent


class NotPlain:
    """Any object other than a tensor or a plain value (unpickling one could run code)."""


def save_files(out_dir: Path, step: int, **files) -> Path:
    """A checkpoint at ``step`` holding ``<name>.pt`` for each keyword."""

    def fill(p):
        for name, value in files.items():
            p.save(f"{name}.pt", value)

    return write(out_dir, step, ENV, fill, identity={"run": "test"})


def read_model(folder: Path, manifest: Manifest):
    return read(folder, "model.pt", manifest=manifest)


def entries(out_dir: Path) -> list[str]:
    return sorted(os.listdir(out_dir / "checkpoints"))


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **kwargs)


# --- writing ---------------------------------------------------------------------------------------------------


def test_a_checkpoint_is_a_folder_of_files_and_a_manifest_hashed_while_written(tmp_path):
    state = {"w": torch.randn(300, 100), "big": torch.randn(3, 512, 1024), "step": 7, "names": ["a", "b"]}

    def fill(p):
        p.save("model.pt", state)
        with p.open("notes/config.json") as f:
            f.write(b'{"lr": 0.1}')

    folder = write(tmp_path, 12, ENV, fill, identity={"model": "tiny", "rows": 64}, extra={"loss": 0.5})
    assert folder == tmp_path / "checkpoints" / "step-00000012" and entries(tmp_path) == [folder.name]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["manifest.json", "model.pt", "notes/config.json"]
    manifest = Manifest.load(folder)
    assert (manifest.format, manifest.step, manifest.world_size) == (layout.FORMAT, 12, 1)
    assert manifest.identity == {"model": "tiny", "rows": 64} and manifest.extra == {"loss": 0.5}
    assert set(manifest.versions) == {"hf_loop", "torch", "transformers", "datasets", "python"}
    assert manifest.versions["torch"] == torch.__version__ and datetime.fromisoformat(manifest.created).tzinfo
    assert sorted(manifest.files) == ["model.pt", "notes/config.json"]
    for name, record in manifest.files.items():  # the digest taken while writing equals a re-read
        data = (folder / name).read_bytes()
        assert (record.size, record.sha256, record.rank) == (len(data), hashlib.sha256(data).hexdigest(), 0)
    loaded = read(folder, "model.pt")
    assert torch.equal(loaded["w"], state["w"]) and (loaded["step"], loaded["names"]) == (7, ["a", "b"])
    assert torch.equal(loaded["big"], state["big"])  # 6 MB: hashed on a second thread, synced while it runs
    # torch.save ran without its per-record CRC32 (the sha256 covers the bytes); torch.load reads the file as
    # usual, and torch's global setting is back for everyone else.
    with zipfile.ZipFile(folder / "model.pt") as archive:
        assert {info.CRC for info in archive.infolist() if info.file_size > 1 << 20} == {0}
    assert torch.equal(torch.load(folder / "model.pt", weights_only=True, mmap=True)["big"], state["big"])
    assert torch.serialization.get_crc32_options() is True


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_files_another_library_writes_are_registered_with_add(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = {"weight": torch.randn(4, 3), "bias": torch.randn(4)}

    def fill(p):
        dcp.save(
            model, checkpoint_id=p.folder / "model"
        )  # real DCP files: model/.metadata, model/__0_0.distcp
        p.add("model")
        p.save("train_state.pt", {"step": 3})

    folder = write(tmp_path, 3, ENV, fill, identity={})
    manifest = Manifest.load(folder)
    written = sorted(p.relative_to(folder).as_posix() for p in (folder / "model").rglob("*") if p.is_file())
    assert sorted(n for n in manifest.files if n.startswith("model/")) == written
    assert "model/.metadata" in written and any(n.endswith(".distcp") for n in written)
    for name in written:
        assert manifest.files[name].sha256 == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert store.verify(folder, "model") == manifest  # DCP reads its files itself: verify them first
    restored = {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}
    dcp.load(restored, checkpoint_id=folder / "model")
    assert all(torch.equal(restored[k], model[k]) for k in model)
    shard = next(folder / n for n in written if n.endswith(".distcp"))
    _flip_a_byte(shard)
    with pytest.raises(CorruptCheckpoint, match=rf"{shard.name}: sha256 mismatch"):
        store.verify(folder, ["model"])
    store.verify(folder, "train_state.pt")
    with pytest.raises(hl.CheckpointError, match=r"has no file under \['optim'\]; it lists \['model/"):
        store.verify(folder, "optim")


def test_an_error_while_filling_leaves_nothing_behind_and_the_earlier_checkpoint_intact(tmp_path):
    save_files(tmp_path, 1, model=torch.ones(2))

    def fails_after_a_file(p):
        p.save("model.pt", torch.zeros(2))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write(tmp_path, 2, ENV, fails_after_a_file, identity={})
    with pytest.raises(Exception, match="lambda"):  # torch.save fails halfway through the file
        write(tmp_path, 2, ENV, lambda p: p.save("model.pt", {"f": lambda: 0}), identity={})
    assert entries(tmp_path) == ["step-00000001"]  # no step-2 folder, no temporary folder
    assert torch.equal(load_newest(tmp_path, ENV, read_model).state, torch.ones(2))


@pytest.mark.parametrize("name", ["/abs.pt", "../up.pt", "a/../b.pt", "", "./a.pt", "a//b.pt", "a\\b.pt"])
def test_a_file_name_outside_the_folder_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match=r"must be a relative path like 'model.pt' or 'model/0.pt', got"):
        write(tmp_path, 1, ENV, lambda p: p.save(name, 1), identity={})
    assert entries(tmp_path) == []


def test_names_the_layer_owns_or_already_used_and_identity_that_is_not_plain_json_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'manifest.json' is written by hf_loop itself"):
        write(tmp_path, 1, ENV, lambda p: p.save("manifest.json", 1), identity={})
    with pytest.raises(ValueError, match="'a.pt' is already part of this checkpoint"):
        write(tmp_path, 1, ENV, lambda p: (p.save("a.pt", 1), p.save("a.pt", 2)), identity={})
    with pytest.raises(ValueError, match="nothing named 'dcp' in .*write it there first"):
        write(tmp_path, 1, ENV, lambda p: p.add("dcp"), identity={})
    cases = [
        ({"shape": (2, 3)}, r"reads back as \{'shape': \[2, 3\]\}: use lists instead of tuples"),
        ({1: "a"}, "str keys"),
        ({"loss": float("nan")}, "plain JSON values .*Out of range float"),
        ({"model": NotPlain()}, "plain JSON values .*NotPlain is not JSON serializable"),
        (["a"], "identity must be a dict of plain JSON values, got list"),
    ]
    for identity, message in cases:
        with pytest.raises(TypeError, match=message):
            write(tmp_path, 1, ENV, lambda p: None, identity=identity)
    with pytest.raises(TypeError, match="extra must hold plain JSON"):
        write(tmp_path, 1, ENV, lambda p: None, identity={}, extra={"x": {1, 2}})
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        write(tmp_path, -1, ENV, lambda p: None, identity={})
    assert entries(tmp_path) == []


def test_a_rerun_reaching_the_same_step_replaces_the_folder(tmp_path):
    save_files(tmp_path, 5, model=torch.zeros(2))
    save_files(tmp_path, 5, model=torch.ones(2))
    assert entries(tmp_path) == ["step-00000005"]
    assert torch.equal(read(step_folder(tmp_path, 5), "model.pt"), torch.ones(2))


def test_a_checkpoint_set_aside_by_a_replacement_that_died_is_restored_by_the_lock_holder(tmp_path, caplog):
    folder = save_files(tmp_path, 5, model=torch.ones(2))
    # What a writer killed between its two renames leaves: the old folder set aside, the new one unfinished.
    os.rename(folder, folder.with_name(".old-step-00000005-999-abcd1234"))
    (folder.parent / ".tmp-step-00000005-999-abcd1234").mkdir()
    assert candidates(tmp_path) == []
    with caplog.at_level(logging.INFO, logger="hf_loop"), OutDirLock(tmp_path):
        assert entries(tmp_path) == ["step-00000005"]
    assert "restored step-00000005, set aside by a run that stopped while replacing it" in caplog.text
    assert torch.equal(read(folder, "model.pt"), torch.ones(2))


def test_a_live_writer_holds_out_dir_and_once_killed_mid_write_its_lock_and_leftovers_are_taken_over(
    tmp_path, caplog
):
    writer = python(
        "import os, signal, sys, torch\n"
        "from hf_loop import DistEnv\n"
        "from hf_loop.checkpoint import OutDirLock, write\n"
        "out = sys.argv[1]\n"
        "OutDirLock(out).__enter__()\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "write(out, 1, DistEnv(), lambda p: p.save('model.pt', torch.ones(3)), identity={})\n"
        "def dies(p):\n"
        "    p.save('model.pt', torch.full((3,), 2.0))\n"
        "    with p.open('optimizer.pt') as f:\n"
        "        f.write(b'x' * 1000)\n"
        "        f.flush()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "write(out, 2, DistEnv(), dies, identity={})\n",
        str(tmp_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert writer.stdout.readline().strip() == "locked"
    expected = rf"in use by pid {writer.pid} on host {socket.gethostname()} \(since .*another out_dir"
    with pytest.raises(hl.CheckpointError, match=expected):
        OutDirLock(tmp_path).__enter__()
    writer.stdin.write("go\n")
    writer.stdin.close()
    assert writer.wait(timeout=120) == -signal.SIGKILL
    left = entries(tmp_path)
    assert left[0].startswith(".tmp-step-00000002-") and left[1:] == ["step-00000001"]
    assert [c.folder.name for c in candidates(tmp_path)] == ["step-00000001"]
    assert torch.equal(load_newest(tmp_path, ENV, read_model).state, torch.ones(3))
    with caplog.at_level(logging.WARNING, logger="hf_loop"), OutDirLock(tmp_path):
        assert entries(tmp_path) == ["step-00000001"]  # the dead writer's temporary folder is gone
        save_files(tmp_path, 2, model=torch.full((3,), 2.0))
    assert f"taking over the lock left by pid {writer.pid} on host {socket.gethostname()}" in caplog.text
    assert torch.equal(load_newest(tmp_path, ENV, read_model).state, torch.full((3,), 2.0))


# --- the lock ------------------------------------------------------------------------------------------------


def test_the_lock_records_its_holder_refuses_a_second_holder_and_is_released_cleanly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_loop"):
        with OutDirLock(tmp_path) as taken:
            record = json.loads(taken.path.read_text())
            assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
            assert datetime.fromisoformat(record["started"]).tzinfo
            with pytest.raises(hl.CheckpointError, match="in use by this process .*which holds it already"):
                OutDirLock(tmp_path).__enter__()
        assert taken.path.read_text() == ""  # released
        with OutDirLock(tmp_path):
            pass
    assert caplog.text == ""  # a lock released cleanly is taken again without a warning


def test_a_lock_left_on_another_host_is_refused_with_how_to_remove_it(tmp_path):
    record = {"pid": 4242, "host": "other-node-7", "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / lock.LOCK).write_text(json.dumps(record))
    with pytest.raises(
        hl.CheckpointError, match=r"pid 4242 on host other-node-7 .*cannot check .*delete .*hf_loop.lock"
    ):
        OutDirLock(tmp_path).__enter__()


# --- reading and falling back --------------------------------------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "model.pt: truncated: "),
    "emptied": (lambda p: p.write_bytes(b""), "model.pt: empty (the manifest says "),
    "flipped": (_flip_a_byte, "model.pt: sha256 mismatch (the file changed after it was written)"),
    "deleted": (lambda p: p.unlink(), "model.pt: missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, caplog, damage):
    for step in (10, 12):
        save_files(tmp_path, step, model={"w": torch.full((256,), float(step))})
    spoil, reason = DAMAGE[damage]
    spoil(step_folder(tmp_path, 12) / "model.pt")
    with caplog.at_level(logging.WARNING, logger="hf_loop"):
        found = load_newest(tmp_path, ENV, read_model)
    assert found.folder == step_folder(tmp_path, 10) and found.manifest.step == 10
    assert torch.equal(found.state["w"], torch.full((256,), 10.0))
    assert f"skipping checkpoints/step-00000012: {reason}" in caplog.text
    assert "; resuming from step-00000010" in caplog.text
    with pytest.raises(CorruptCheckpoint, match=rf"checkpoint .*step-00000012: {reason.split(':')[0]}: "):
        read(step_folder(tmp_path, 12), "model.pt")


def test_read_refuses_a_pickled_object_that_is_not_a_tensor_or_plain_value(tmp_path, caplog):
    save_files(tmp_path, 1, model={"w": torch.ones(1)})
    folder = write(tmp_path, 2, ENV, lambda p: p.save("model.pt", {"w": NotPlain()}), identity={})
    with pytest.raises(
        CorruptCheckpoint, match="step-00000002: model.pt: holds pickled objects other than tensors"
    ):
        read(folder, "model.pt")
    with caplog.at_level(logging.WARNING, logger="hf_loop"):
        assert load_newest(tmp_path, ENV, read_model).folder.name == "step-00000001"
    assert "skipping checkpoints/step-00000002: model.pt: holds pickled objects" in caplog.text


def test_only_complete_step_folders_with_canonical_names_are_checkpoints(tmp_path, caplog):
    for step in (0, 10, 20):
        save_files(tmp_path, step, model=torch.tensor([float(step)]))
    root = tmp_path / "checkpoints"
    (root / "step-00000030").mkdir()  # files but no manifest
    (root / "step-00000030" / "model.pt").write_bytes(b"half")
    (root / "step-00000040").mkdir()
    (root / "step-00000040" / "manifest.json").write_text("{not json")
    for name in ("step-00000050.backup", "step-060", "foo-step-00000070", "step-00000080"):
        shutil.copytree(step_folder(tmp_path, 20), root / name)  # step-00000080's manifest says step 20
    (root / "logs").mkdir()
    (root / ".tmp-step-00000090-1-abcd").mkdir()
    with caplog.at_level(logging.WARNING, logger="hf_loop"):
        assert [c.folder.name for c in candidates(tmp_path)] == [
            "step-00000020",
            "step-00000010",
            "step-00000000",
        ]
    assert (
        "skipping checkpoints/step-00000080: manifest.json: records step 20, the folder name says 80"
        in caplog.text
    )
    assert "skipping checkpoints/step-00000040: manifest.json: Expecting property name" in caplog.text
    assert "skipping checkpoints/step-00000030: manifest.json: missing" in caplog.text
    assert caplog.text.count("skipping") == 3
    assert load_newest(tmp_path, ENV, read_model).folder.name == "step-00000020"
    assert (
        candidates(tmp_path / "nothing-here") == []
        and load_newest(tmp_path / "none", ENV, read_model) is None
    )


def test_an_error_that_is_not_damage_is_raised_not_skipped(tmp_path):
    for step in (1, 2):
        save_files(tmp_path, step, model=torch.ones(1))
    with pytest.raises(
        hl.CheckpointError, match=r"has no file 'optimizer.pt'; its manifest lists \['model.pt'\]"
    ) as info:
        load_newest(tmp_path, ENV, lambda folder, m: read(folder, "optimizer.pt", manifest=m))
    assert not isinstance(info.value, CorruptCheckpoint)  # a fresh start would silently lose the run
    with pytest.raises(KeyError):
        load_newest(tmp_path, ENV, lambda folder, m: {}["missing"])


# --- retention ------------------------------------------------------------------------------------------------


def test_prune_keeps_the_last_k_and_the_spared_ones(tmp_path):
    for step in range(1, 6):
        save_files(tmp_path, step, model=torch.tensor([float(step)]))
    removed = prune(tmp_path, keep_last=2, keep=[step_folder(tmp_path, 1), None])
    assert [p.name for p in removed] == ["step-00000003", "step-00000002"]
    assert entries(tmp_path) == ["step-00000001", "step-00000004", "step-00000005"]
    with pytest.raises(ValueError, match="keep_last must be an int >= 1, got 0"):
        prune(tmp_path, keep_last=0)


def test_prune_never_deletes_the_newest_intact_checkpoint(tmp_path):
    for step in range(1, 5):
        save_files(tmp_path, step, model=torch.tensor([float(step)]))
    (step_folder(tmp_path, 4) / "manifest.json").unlink()
    DAMAGE["truncated"][0](step_folder(tmp_path, 3) / "model.pt")
    assert [p.name for p in prune(tmp_path, keep_last=2)] == ["step-00000001"]
    assert entries(tmp_path) == ["step-00000002", "step-00000003", "step-00000004"]
    assert load_newest(tmp_path, ENV, read_model).folder.name == "step-00000002"


# --- a full disk ---------------------------------------------------------------------------------------------

DISK_FULL_SCRIPT = """
import io, json, os, shutil, sys, torch
from hf_loop import CheckpointError, DistEnv
from hf_loop.checkpoint import load_newest, read, write
out = sys.argv[1]
write(out, 1, DistEnv(), lambda p: p.save("model.pt", torch.ones(64 * 1024)), identity={})
try:
    write(out, 2, DistEnv(), lambda p: p.save("model.pt", torch.zeros(1024 * 1024)), identity={})
    error = None
except CheckpointError as exc:
    error = str(exc)
# Now leave room for the files but not for the manifest (tmpfs counts 4 KB pages): rank 0's last write fails.
buffer = io.BytesIO()
torch.save(torch.zeros(1000), buffer)
pages = -(-len(buffer.getvalue()) // 4096)
with open(os.path.join(out, "filler"), "wb") as f:
    f.write(bytes(shutil.disk_usage(out).free - pages * 4096))
try:
    write(out, 3, DistEnv(), lambda p: p.save("model.pt", torch.zeros(1000)), identity={})
    manifest_error = None
except CheckpointError as exc:
    manifest_error = str(exc)
os.remove(os.path.join(out, "filler"))
found = load_newest(out, DistEnv(), lambda folder, m: read(folder, "model.pt", manifest=m))
print(json.dumps({"error": error, "manifest_error": manifest_error, "found": found.folder.name,
                  "entries": sorted(os.listdir(os.path.join(out, "checkpoints"))), "sum": float(found.state.sum())}))
"""


def test_a_full_disk_is_a_clear_error_and_the_earlier_checkpoints_still_load(tmp_path):
    """On a real 2 MB tmpfs, mounted in a user + mount namespace (no privileges needed where they are allowed)."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True
        ).returncode
    ):
        pytest.skip("user namespaces are not available here to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = 'mount -t tmpfs -o size=2m tmpfs "$0" && exec "$1" -c "$2" "$0"'
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            mount,
            disk,
            sys.executable,
            DISK_FULL_SCRIPT,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    error = result["error"]
    assert f"checkpoint step-00000002 could not be written: the disk holding {disk} is full" in error
    assert "(No space left on device writing model.pt)" in error
    needed = int(error.split(" bytes) on this rank; ")[0].rsplit("(", 1)[1])
    assert f"It needs at least 4.0 MB ({needed} bytes)" in error and needed >= 4 * 1024 * 1024  # the tensor
    free = int(error.split(" bytes) are free once its unfinished folder is removed")[0].rsplit("(", 1)[1])
    assert 1_500_000 < free < 2 * 1024 * 1024  # the 2 MB disk less step 1 (about 260 KB)
    assert "Earlier checkpoints are untouched" in error
    manifest_error = result["manifest_error"]
    assert "step-00000003 could not be written: the disk holding" in manifest_error
    assert "(No space left on device writing manifest.json). It needs at least " in manifest_error
    assert "bytes) for the files of every rank; " in manifest_error
    assert result["entries"] == ["step-00000001"]  # the unfinished folders are gone
    assert (result["found"], result["sum"]) == ("step-00000001", 64 * 1024)


# --- two ranks -----------------------------------------------------------------------------------------------


def _two_ranks(env: hl.DistEnv, out_dir: str) -> dict:
    out = Path(out_dir)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("hf_loop").addHandler(handler)

    def fill(p):
        p.save(f"rank-{env.rank}.pt", {"x": torch.full((3,), float(env.rank))})
        if env.is_main:
            p.save("shared.pt", {"w": torch.arange(4.0)})

    def fails_on_rank_1(p):
        p.save(f"rank-{env.rank}.pt", torch.ones(2))
        if env.rank == 1:
            raise RuntimeError("rank 1 cannot write")

    def outcome(fill_fn, step):
        try:
            write(out, step, env, fill_fn, identity={"run": "ddp"})
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    result = {"first": outcome(fill, 1)}
    result["manifest"] = Manifest.load(step_folder(out, 1)).to_json()
    result["failed"] = outcome(fails_on_rank_1, 2)
    result["after_failure"] = entries(out)
    barrier(env)  # both ranks list before rank 0 starts the next write
    result["duplicate"] = outcome(lambda p: p.save("same.pt", env.rank), 2)
    outcome(fill, 3)
    barrier(env)
    if env.rank == 1:  # damage only what rank 1 reads
        _flip_a_byte(step_folder(out, 3) / "rank-1.pt")
    barrier(env)

    def read_mine(folder, manifest):
        return read(folder, f"rank-{env.rank}.pt", manifest=manifest), read(
            folder, "shared.pt", manifest=manifest
        )

    found = load_newest(out, env, read_mine)
    result["found"], result["x"] = found.folder.name, found.state[0]["x"].tolist()
    result["messages"] = messages
    return result


def test_two_ranks_write_one_checkpoint_and_fail_together(tmp_path):
    results = run_distributed(_two_ranks, world_size=2, args=(str(tmp_path),))
    assert [r["first"] for r in results] == [None, None]
    manifest = Manifest.parse(results[0]["manifest"])
    assert manifest.world_size == 2
    assert {name: record.rank for name, record in manifest.files.items()} == {
        "rank-0.pt": 0, "rank-1.pt": 1, "shared.pt": 0,
    }  # fmt: skip
    for name, record in manifest.files.items():
        assert record.sha256 == hashlib.sha256((step_folder(tmp_path, 1) / name).read_bytes()).hexdigest()
    assert results[1]["failed"] == "RuntimeError: rank 1 cannot write"
    assert results[0]["failed"] == (
        "CheckpointError: step-00000002 was not written: rank 1: RuntimeError: rank 1 cannot write. Nothing was "
        "renamed; earlier checkpoints are untouched."
    )
    assert [r["after_failure"] for r in results] == [["step-00000001"]] * 2  # no step-2, no temporary folder
    assert all("'same.pt' was written by ranks [0, 1] (one rank per file)" in r["duplicate"] for r in results)
    # rank 1's own file of step 3 is damaged: both ranks fall back to step 1 together
    assert [(r["found"], r["x"]) for r in results] == [
        ("step-00000001", [0.0] * 3),
        ("step-00000001", [1.0] * 3),
    ]
    assert (
        "skipping checkpoints/step-00000003: rank-1.pt: sha256 mismatch (the file changed after it was written) "
        "(rank 1); resuming from step-00000001"
    ) in results[0]["messages"]
    assert results[1]["messages"] == []  # rank 0 alone reports
    assert entries(tmp_path) == ["step-00000001", "step-00000003"]
