"""Two-process data-parallel HESSO (gloo on CPU): both ranks end identical, with the same pruned set."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, use_cric: bool) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny import tiny_model

    from hf_oto import discover_groups
    from hf_oto.optim import HESSO, CRICConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_model("llama")  # same seed on both ranks
    space = discover_groups(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    cric = CRICConfig(sampling_steps=3, min_cycles=2, max_cycles=2) if use_cric else None
    opt = HESSO(model, space, base_kwargs={"lr": 1e-3}, target_sparsity=0.5, start_pruning_step=2,
                pruning_steps=6, pruning_periods=2, cric=cric)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(16):
        ids = torch.randint(3, 64, (2, 10), generator=gen)
        opt.zero_grad()
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.observe_loss(loss)  # each rank's local loss; CRIC averages it across ranks
        opt.step()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["__pruned__"] = opt.pruned.to(torch.uint8)
    save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


@pytest.mark.parametrize("use_cric", [False, True])
def test_two_ranks_end_identical(tmp_path, use_cric):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), use_cric), nprocs=2, join=True)
    a, b = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(a["__pruned__"].sum()) > 0


def test_fsdp_sharded_parameters_are_refused_with_a_clear_message(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        from tiny import tiny_model

        from hf_oto import discover_groups
        from hf_oto.optim import HESSO

        model = tiny_model("llama")
        space = discover_groups(model)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ValueError, match="FSDP-sharded parameters"):
            HESSO(model, space, base_kwargs={"lr": 1e-3}, target_sparsity=0.5, pruning_steps=4, pruning_periods=2)
    finally:
        dist.destroy_process_group()
