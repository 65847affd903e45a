"""Two-process data-parallel HESSO (gloo on CPU): both ranks end identical, with the same pruned set."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from ranks import free_port, join, leave
from safetensors.torch import load_file, save_file


def _worker(rank: int, world: int, port: int, out_dir: str, use_cric: bool, granularity: str = "width",
            criterion: str = "hesso") -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny import make_hesso, tiny_model

    from hf_oto import discover_groups
    from hf_oto.groups.depth import with_granularity
    from hf_oto.optim import CRICConfig

    join(rank, world, port)
    model = tiny_model("llama")  # same seed on both ranks
    if granularity != "width":  # each rank's block influence comes from its own (training) batches: HESSO sums it
        model = tiny_model("llama", num_hidden_layers=4).train()
    space = with_granularity(model, discover_groups(model), granularity)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    cric = CRICConfig(sampling_steps=3, min_cycles=2, max_cycles=2) if use_cric else None
    opt = make_hesso(model, space, base_kwargs={"lr": 1e-3}, target_sparsity=0.5, start_pruning_step=2,
                pruning_steps=6, pruning_periods=2, cric=cric, criterion=criterion)
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
    if opt._turn:
        state["__local_turn__"] = opt._turn.state()
    if criterion == "wanda_sp":
        state["__local_activations__"] = opt.criterion.state()
    save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))
    leave()


@pytest.mark.parametrize("use_cric, granularity, criterion", [(False, "width", "hesso"), (True, "width", "hesso"),
                                                               (False, "depth", "hesso"), (False, "width", "wanda_sp")])
def test_two_ranks_end_identical(tmp_path, use_cric, granularity, criterion):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), use_cric, granularity, criterion), nprocs=2, join=True)
    a, b = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert a.keys() == b.keys()
    if granularity != "width":  # the ranks measured different turns, yet removed the same layers
        assert not torch.equal(a.pop("__local_turn__"), b.pop("__local_turn__"))
    if criterion == "wanda_sp":  # the ranks saw different activations, yet removed the same groups
        assert not torch.equal(a.pop("__local_activations__"), b.pop("__local_activations__"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(a["__pruned__"].sum()) > 0


def _fsdp_worker(rank: int, world: int, port: int, out_dir: str, use_cric: bool) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny import make_hesso, tiny_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_oto import discover_groups
    from hf_oto.optim.saliency import group_statistics

    join(rank, world, port)
    model = tiny_model("llama")
    space = discover_groups(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_hesso(model, space, **_fsdp_settings(use_cric))
    for step in range(16):
        ids = _fsdp_batch(step)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.observe_loss(loss)
        opt.step()
        opt.zero_grad()
    assert opt._rows, "the parameters were not sharded"
    sharded = group_statistics(dict(model.named_parameters()), space).sq
    from hf_oto import construct_subnet
    from hf_oto.optim.shard import unsharded_copy

    small = construct_subnet(unsharded_copy(model), space, layout="uniform").model  # collective gather, then slice
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    whole = group_statistics(full, space).sq
    if rank == 0:
        probe = _fsdp_batch(99)[0]
        save_file({**{n: t.contiguous() for n, t in full.items()}, "_pruned": opt.pruned.to(torch.uint8),
                   "_small_logits": small(input_ids=probe).logits.detach(),
                   "_sq_sharded": sharded, "_sq_full": whole}, os.path.join(out_dir, "fsdp.safetensors"))
    leave()


def _fsdp_settings(use_cric: bool) -> dict:
    from hf_oto.optim import CRICConfig

    cric = CRICConfig(sampling_steps=3, min_cycles=2, max_cycles=2) if use_cric else None
    return dict(base_kwargs={"lr": 1e-3}, target_sparsity=0.5, start_pruning_step=2, pruning_steps=6,
                pruning_periods=2, cric=cric)


def _fsdp_batch(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randint(3, 64, (2, 12), generator=gen) for _ in range(2)]


@pytest.mark.parametrize("use_cric", [False, True])
def test_fsdp2_two_ranks_match_one_process(tmp_path, use_cric):
    """FSDP2 (fully_shard, gloo on CPU): per-group sums over shards equal the full sums, and two
    sharded ranks prune exactly what one unsharded process does on the same global batches."""
    from tiny import make_hesso, tiny_model

    from hf_oto import discover_groups

    mp.spawn(_fsdp_worker, args=(2, free_port(), str(tmp_path), use_cric), nprocs=2, join=True)
    got = load_file(str(tmp_path / "fsdp.safetensors"))
    torch.testing.assert_close(got.pop("_sq_sharded"), got.pop("_sq_full"), rtol=1e-5, atol=1e-6)

    model = tiny_model("llama")
    opt = make_hesso(model, discover_groups(model), **_fsdp_settings(use_cric))
    for step in range(16):
        ids = torch.cat(_fsdp_batch(step))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.observe_loss(loss)
        opt.step()
        opt.zero_grad()
    assert torch.equal(got.pop("_pruned").bool(), opt.pruned) and int(opt.pruned.sum()) > 0
    from hf_oto import construct_subnet

    small = construct_subnet(model.eval(), discover_groups(model), layout="uniform").model
    torch.testing.assert_close(got.pop("_small_logits"), small(input_ids=_fsdp_batch(99)[0]).logits.detach(),
                               rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-4, atol=1e-5)
        assert torch.equal(got[name] == 0, p.detach() == 0) or name.endswith("norm.weight"), name
