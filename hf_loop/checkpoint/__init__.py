"""Checkpoints: step folders with a manifest (``store``), what a run saves and resumes (``manager``), and the
identity a resume must match (``identity``)."""

from hf_loop.checkpoint.identity import check_identity, model_identity, run_identity
from hf_loop.checkpoint.manager import Checkpointer
from hf_loop.checkpoint.store import step_folder

__all__ = ["Checkpointer", "check_identity", "model_identity", "run_identity", "step_folder"]
