"""Memory per rank, DDP vs FSDP2 (hl.shard): parameter, gradient and optimizer bytes each rank holds.

A causal LM of a few million parameters (Llama layout: hidden 256, 4 layers, vocabulary 8k) trains a few AdamW
steps through hl.train on 1 and 2 real processes (gloo on CPU; NCCL on a CUDA machine). After the last step every
rank counts the bytes of what it keeps between steps: its parameters (the local shard of each DTensor), the
gradients (kept here: ``zero_grad`` runs after the count) and the optimizer state (AdamW: ``exp_avg``,
``exp_avg_sq``). DDP replicates all three on every rank; FSDP2 splits them, so the ratio should be about 1/W.
With CUDA it also reports peak allocated memory and steps/s per configuration (not measured on CPU: the peak
includes the activations and the transient all-gathered blocks, which only CUDA's allocator tracks here).

Run: python benchmarks/fsdp.py [--steps 3] [--out benchmarks/results/fsdp.md]
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import arguments, emit, machine  # noqa: E402


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(config)


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


class Counted(torch.optim.AdamW):
    """AdamW that counts this rank's parameter, gradient and optimizer-state bytes before the last step's
    ``zero_grad`` (the loop zeroes gradients right after ``step``), with gradients still held."""

    measured: dict[str, float] = {}

    def step(self, closure=None):
        loss = super().step(closure)
        params = [p for group in self.param_groups for p in group["params"]]
        Counted.measured = {
            "parameters": sum(local_bytes(p) for p in params),
            "gradients": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local_bytes(v) for s in self.state.values() for v in s.values() if v.dim() > 0),
        }
        return loss


def _rank(rank: int, world: int, port: int, sharded: bool, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    import numpy as np
    from datasets import Dataset

    import hf_loop as hl

    torch.set_num_threads(1)
    env = hl.init_distributed()
    try:
        net = hl.shard(model(), env, precision="fp32") if sharded else model()
        ids = np.random.default_rng(0).integers(5, 8000, (64, 128)).tolist()
        data = hl.MapDataset(Dataset.from_dict({"input_ids": ids, "labels": ids}))
        loader = hl.make_loader(data, batch_size=2, sampler="sequential", env=env)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        start = time.perf_counter()
        hl.train(net, loader, Counted(net.parameters(), lr=1e-4),
                 hl.TrainConfig(max_steps=steps, progress=False), env=env)  # fmt: skip
        seconds = time.perf_counter() - start
        result = dict(Counted.measured, steps_per_s=steps / seconds)
        if env.device.type == "cuda":
            result["peak_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        queue.put((rank, result))
    finally:
        hl.shutdown_distributed()


def measure(world: int, sharded: bool, steps: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [
        context.Process(target=_rank, args=(r, world, port, sharded, steps, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return results[0]


def main() -> None:
    parser = arguments(__doc__, repeat=1, steps=3)
    args = parser.parse_args()
    params = sum(p.numel() for p in model().parameters())
    rows, base = [], None
    for world, sharded in ((1, False), (2, False), (2, True)):
        found = measure(world, sharded, args.steps)
        total = found["parameters"] + found["gradients"] + found["optimizer"]
        base = base or total
        name = f"{'FSDP2 (hl.shard)' if sharded else 'DDP' if world > 1 else 'one process'}, {world} rank(s)"
        cells = [f"{found[k] / 2**20:.1f}" for k in ("parameters", "gradients", "optimizer")]
        peak = f" | {found['peak_gb']:.2f} | {found['steps_per_s']:.2f}" if "peak_gb" in found else ""
        rows.append(f"| {name} | {' | '.join(cells)} | {total / 2**20:.1f} | {total / base:.2f}x{peak} |")
    cuda = torch.cuda.is_available()
    header = "| run | parameters MiB | gradients MiB | optimizer MiB | total MiB per rank | vs one process |"
    header += " peak GiB | steps/s |" if cuda else ""
    report = [
        "# Memory per rank: DDP vs FSDP2 (benchmarks/fsdp.py)", "",
        f"{datetime.date.today()}, `python benchmarks/fsdp.py --steps {args.steps}`; Llama layout, {params / 1e6:.1f}M "
        "parameters, fp32, AdamW, per-rank batch 2 x 128 tokens, through hl.train; bytes each rank keeps after a "
        "step (local shards for FSDP2).", "",
        header, "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else ""), *rows, "",
        f"Machine: {machine()}",
    ]  # fmt: skip
    emit(report, args.out)


if __name__ == "__main__":
    main()
