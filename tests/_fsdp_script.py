"""An FSDP2 training run on 2 processes that the kill -9 test launches with torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_fsdp_script.py OUT_DIR

A tiny Llama with dropout, sharded with hl.shard, AdamW, a linear schedule, clipping, accumulation, checkpoints
every 2 steps; OUT_DIR/final_weights.pt (gathered on rank 0) at the end. HF_LOOP_TEST_KILL_AT_STEP=k: rank 0
SIGKILLs itself when step k is logged; HF_LOOP_TEST_KILL_IN_SAVE=n: rank 0 SIGKILLs itself in the n-th checkpoint
of the run, after the shards were written and before the checkpoint is complete. torchrun then stops rank 1.
"""

from __future__ import annotations

import os
import signal
import sys

import torch


def main(out_dir: str) -> None:
    from _train_script import lm_dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_loop as hl
    from hf_loop.checkpoint import manager
    from hf_loop.fsdp import gathered

    torch.set_num_threads(1)
    env = hl.init_distributed()
    try:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, attention_dropout=0.1)  # fmt: skip
        model = hl.shard(LlamaForCausalLM(config), env, precision="fp32")
        loader = hl.make_loader(lm_dataset(48), batch_size=4, sampler="random", seed=3, env=env)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        kill_at = int(os.environ.get("HF_LOOP_TEST_KILL_AT_STEP", "-1"))
        kill_in = int(os.environ.get("HF_LOOP_TEST_KILL_IN_SAVE", "-1"))
        if env.rank == 0 and kill_in > 0:
            original, saves = manager.save_sharded, []

            def save_then_die(state, folder):
                original(state, folder)
                saves.append(folder)
                if len(saves) == kill_in:
                    os.kill(os.getpid(), signal.SIGKILL)

            manager.save_sharded = save_then_die

        def on_log(record: dict) -> None:
            if record.get("step") == kill_at and "loss" in record:
                os.kill(os.getpid(), signal.SIGKILL)

        train_config = hl.TrainConfig(epochs=2, grad_accum=2, checkpoint_every=2, out_dir=out_dir, log_every=1,
                                      scheduler="linear", warmup_steps=1, max_grad_norm=1.0, keep_last=2,
                                      progress=False, export=False)  # fmt: skip
        hl.train(model, loader, optimizer, train_config, env=env, on_log=on_log)
        weights = gathered(model)
        if env.is_main:
            torch.save(weights, os.path.join(out_dir, "final_weights.pt"))
    finally:
        hl.shutdown_distributed()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1])
