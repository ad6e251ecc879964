"""The typed errors every layer raises. Each message names what was received, what was expected, and the fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or unavailable data. The message names what was asked, what exists, and the fix.

    Example:
        >>> from hf_loop.hub import load
        >>> try:
        ...     load("/no/such/folder")
        ... except DataError as e:          # also a ValueError
        ...     print(str(e)[:56])
        no dataset at '/no/such/folder': the path does not exist
    """


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed: another run's, damaged, or the disk is full.

    The message names the checkpoint (or ``out_dir``), what differs or failed, and the fix.

    Example:
        >>> _ = hl.train(model, loader, optimizer, hl.TrainConfig(out_dir="runs/a"))
        >>> sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> try:                                    # the same out_dir: it would resume AdamW's state into SGD
        ...     hl.train(model, loader, sgd, hl.TrainConfig(out_dir="runs/a"))
        ... except CheckpointError as e:            # also a ValueError
        ...     print(str(e)[:68])
        checkpoint runs/a/checkpoints/step-00000004 belongs to another run:
    """
