"""Self-generated replay: text the dense model writes itself, mixed into a domain's training blocks.

Pruning on one domain (say code) removes what the model used for everything else, and training on
that domain alone does not bring it back. Sequences the dense model samples from its own
distribution carry that general behaviour without any outside data: mixed into the training blocks,
they are part of what an activation criterion sees and what the pruned model is trained (and
distilled) on. :func:`generate_replay` writes them, :func:`mix_replay` mixes them in.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_oto.errors import ConfigError


@torch.no_grad()
def generate_replay(model: nn.Module, n: int, length: int, *, start_token_id: int, seed: int = 0,
                    batch_size: int = 64, top_p: float = 0.95, temperature: float = 1.0,
                    progress: bool = True) -> torch.Tensor:
    """``n`` sequences of exactly ``length`` tokens sampled from ``model`` (nucleus sampling, from
    ``start_token_id`` alone, ``batch_size`` sequences at a time), as an ``(n, length)`` int64 tensor on
    the CPU; the same ``seed`` and ``batch_size`` give the same sequences on the same machine and versions.
    Each sampling step costs nearly the same for 16 rows as for 64 on a CPU, so larger batches pay
    (SmolLM2-135M, 2 cores: 2.7 s per 256-token sequence at 16, 1.5 s at 64)."""
    if n < 1 or length < 2:
        raise ConfigError(f"replay needs at least one sequence of two tokens or more, got n={n}, length={length}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    out = []
    try:
        with g:
            torch.manual_seed(seed)
            for start in tqdm(range(0, n, batch_size), desc="replay: generating", disable=not progress):
                rows = min(batch_size, n - start)
                ids = torch.full((rows, 1), start_token_id, dtype=torch.long, device=device)
                seqs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=top_p,
                                      top_k=0, temperature=temperature, max_new_tokens=length - 1,
                                      min_new_tokens=length - 1, pad_token_id=start_token_id)
                out.append(seqs[:, :length].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def mix_replay(blocks: torch.Tensor, generated: torch.Tensor, fraction: float) -> torch.Tensor:
    """``blocks`` with ``generated`` appended, repeated so that a uniform draw from the result is a
    generated sequence with probability ``fraction`` (to within one repeat). The front interleaves one
    generated row in every ``round(1 / fraction)`` (each generated sequence once, while the training
    blocks last), so calibration taken from the front sees about the same share."""
    if not 0 < fraction < 1:
        raise ConfigError(f"the replay fraction must be in (0, 1), got {fraction}")
    if blocks.shape[1:] != generated.shape[1:]:
        raise ConfigError(f"replay blocks have shape {tuple(generated.shape[1:])}, the training blocks "
                          f"{tuple(blocks.shape[1:])}")
    repeats = max(1, round(fraction / (1 - fraction) * len(blocks) / len(generated)))
    pool = generated.repeat(repeats, 1)
    every = max(1, round(1 / fraction))  # the front: one generated row in every `every`
    front_gen = min(len(generated), len(blocks) // max(every - 1, 1))
    front, used = [], 0
    for i in range(front_gen * every):
        if i % every == every - 1:
            front.append(generated[i // every])
        else:
            front.append(blocks[used])
            used += 1
    front = torch.stack(front) if front else blocks[:0]
    return torch.cat([front, blocks[used:], pool[front_gen:]])


def start_token(tokenizer) -> int:
    """The token replay samples from: the tokenizer's BOS token, else its EOS token."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ConfigError("replay_fraction needs a tokenizer with a BOS or EOS token to start sampling from")
    return start


DEFAULT_SAMPLES = 256  # without max_steps the run's number of draws is not known up front


def replay_samples(fraction: float, draws: int | None, cap: int = 4096) -> int:
    """How many sequences to generate: one per replayed draw of a run of ``draws`` training sequences
    (each is then seen about once), at most ``cap``; :data:`DEFAULT_SAMPLES` when ``draws`` is unknown."""
    if draws is None:
        return DEFAULT_SAMPLES
    return max(1, min(cap, math.ceil(draws * fraction)))
