"""Checkpoints: step folders with a verified manifest (``store`` with ``layout``, ``pending``, ``lock``), what a
run saves and resumes (``manager``), and the identity a resume must match (``identity``)."""

from hf_loop.checkpoint.identity import check_identity, data_identity, model_identity, run_identity
from hf_loop.checkpoint.layout import FORMAT, Candidate, CorruptCheckpoint, FileRecord, Manifest, step_folder
from hf_loop.checkpoint.lock import OutDirLock
from hf_loop.checkpoint.manager import Checkpointer
from hf_loop.checkpoint.pending import PendingCheckpoint
from hf_loop.checkpoint.store import Loaded, candidates, load_newest, prune, read, verify, write

__all__ = [
    "FORMAT",
    "Candidate",
    "Checkpointer",
    "CorruptCheckpoint",
    "FileRecord",
    "Loaded",
    "Manifest",
    "OutDirLock",
    "PendingCheckpoint",
    "candidates",
    "check_identity",
    "data_identity",
    "load_newest",
    "model_identity",
    "prune",
    "read",
    "run_identity",
    "step_folder",
    "verify",
    "write",
]
