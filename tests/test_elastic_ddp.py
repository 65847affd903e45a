"""Elastic sizes under data parallelism: two ranks (gloo on CPU, DDP), each on its half of every global
batch, plan the same nested keep-sets and end with the same weights as one process on the whole batches."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from ranks import free_port, join, leave
from safetensors.torch import load_file, save_file

STEPS = 8


def _batch(step: int) -> torch.Tensor:
    """The global batch of ``step``: 4 sequences, two per rank."""
    return torch.randint(3, 64, (4, 10), generator=torch.Generator().manual_seed(500 + step))


def _run(model, space, pricing: str, rank: int | None, world: int):
    """Train ``model`` for STEPS elastic steps as the trainer does (full-model loss plus each drawn size's
    in-place KL to the full model's logits, one backward); ``rank`` None: one process on whole batches."""
    from hf_oto.optim import HESSOConfig
    from hf_oto.optim.elastic import Elastic, ElasticConfig
    from hf_oto.trainer.distill import kl_sum

    def part(ids):
        return ids if rank is None else ids.chunk(world)[rank]

    probe_ids = part(_batch(99))
    net = model if rank is None else torch.nn.parallel.DistributedDataParallel(model)

    def probe() -> float:
        with torch.no_grad():
            return float(net(input_ids=probe_ids, labels=probe_ids).loss)

    config = HESSOConfig(layout="per_layer_ffn", criterion="fisher", selection="per_param", pricing=pricing)
    opt = Elastic(model, space, torch.optim.AdamW(model.parameters(), lr=1e-2), config,
                  ElasticConfig(sizes=(0.75, 0.5), start=3, freeze=5, refresh_every=2),
                  probe=probe if pricing == "measured" else None)
    for step in range(STEPS):
        ids = part(_batch(step))
        out = net(input_ids=ids, labels=ids)
        loss, target = out.loss, out.logits.detach()
        mask = torch.ones(ids.shape[0], ids.shape[1] - 1)
        for size in opt.sizes_for_step():
            with opt.subnetwork(size):
                logits = net(input_ids=ids).logits
            loss = loss + kl_sum(logits, target, mask, 1.0) / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _worker(rank: int, world: int, port: int, out_dir: str, pricing: str, granularity: str) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny import tiny_model

    from hf_oto import discover_groups
    from hf_oto.groups.depth import with_granularity

    join(rank, world, port)
    model = tiny_model("llama", num_hidden_layers=4, intermediate_size=64).train()  # same seed on both ranks
    space = with_granularity(model, discover_groups(model), granularity, "per_layer_ffn")
    opt = _run(model, space, pricing, rank, world)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["__removed__"] = opt.removed_flags.to(torch.uint8)
    save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))
    leave()


@pytest.mark.parametrize("pricing, granularity", [("saliency", "width"), ("measured", "both")])
def test_two_ranks_plan_and_train_what_one_process_does(tmp_path, pricing, granularity):
    """DDP averages the gradients of the two halves, which is the one process's gradient of the whole
    batch; the criterion's evidence, the block influence (summed over ranks) and measured pricing's probe
    loss (averaged over ranks) follow, so the keep-sets are the same and the weights agree to rounding."""
    from tiny import tiny_model

    from hf_oto import discover_groups
    from hf_oto.groups.depth import with_granularity

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), pricing, granularity), nprocs=2, join=True)
    a, b = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the ranks agree exactly

    model = tiny_model("llama", num_hidden_layers=4, intermediate_size=64).train()
    space = with_granularity(model, discover_groups(model), granularity, "per_layer_ffn")
    opt = _run(model, space, pricing, None, 2)
    removed = a.pop("__removed__").bool()
    assert torch.equal(removed, opt.removed_flags)
    assert bool(removed[-1].any()) and opt.rankings == 2
    if granularity == "both":  # whole layers or blocks were on offer and ranked by their turn
        assert opt._turn and bool((opt._turn.sums[:, 1] > 0).all())
    for name, p in model.state_dict().items():
        torch.testing.assert_close(a[name], p, rtol=1e-4, atol=1e-5)
