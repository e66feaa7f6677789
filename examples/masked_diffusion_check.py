"""Learning check for masked diffusion LMs: does DiffusionBlocks train MD4?

Trains the ``md4-tiny`` preset (4 layers, width 64, sequence 64, text8's alphabet: a-z, space
and [MASK]) on English text that ships with Python itself (``pydoc_data.topics``, the help
topics, about 376k characters once reduced to text8's alphabet as text8 is: lowercase, every run
of other characters one space; no download), end-to-end with MD4's loss and with DiffusionBlocks
at B=2 (t partitioned at 0.5, one block per step, B times the steps), with the same optimizer
for both: AdamW at 1e-3 (the authors' default), weight decay 0.01, gradient clipping at 1.0,
constant learning rate. The last 10% of the text is held out.

It prints, per technique and seed, the held-out ELBO in bits per character: the MD4 bound
E_t[w(t) * masked cross-entropy] / ln 2, estimated with t stratified over each block's range
(t in [0, 0.5) and [0.5, 1], the same draws for both techniques) and DRAWS draws per sequence;
for DiffusionBlocks the block whose range holds t predicts, so this is the bound of the chained
model the sampler runs. Then, per block, its held-out masked cross-entropy at times of its own
range against the same block reset to zero init (identity layers): a block that learned nothing
shows. And one sampled line from each DiffusionBlocks model.

The settings below were fixed before any result was seen, sized so that three seeds of both
techniques take about 15 minutes on one CPU thread (1,200 s measured on the shared machine
while other jobs ran):

    python examples/masked_diffusion_check.py --seeds 0,1,2 --threads 1
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from dbprofile.masked_diffusion import BITS_PER_NAT
from dbprofile.methods import make_trainer
from dbprofile.methods.diffusion_blocks.masked import block_loss, time_boundaries
from dbprofile.methods.diffusion_blocks.sampler import held_out_block_losses, sample_masked
from dbprofile.models.registry import PRESETS
from dbprofile.techniques import parse_technique

ALPHABET = " abcdefghijklmnopqrstuvwxyz"
"""text8's 27 characters; id i is ALPHABET[i] and id 27 is [MASK]."""
STEPS = 600
"""End-to-end steps; DiffusionBlocks gets B times as many block-steps."""
BATCH = 32
LR = 1e-3
WEIGHT_DECAY = 0.01
HELD_OUT = 128
"""Held-out sequences of 64 characters (8,192 characters)."""
DRAWS = 8
"""Stratified t draws per held-out sequence and range."""
EVAL_BLOCKS = 2
"""The ELBO is estimated over the ranges of B=2 for every technique, so the estimates pair."""


def text8_like() -> torch.Tensor:
    """pydoc's help topics reduced to text8's alphabet, as ids (1-D int64)."""
    from pydoc_data.topics import topics

    text = re.sub("[^a-z]+", " ", " ".join(topics[key] for key in sorted(topics)).lower())
    return torch.tensor([ALPHABET.index(c) for c in text], dtype=torch.int64)


def split(ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out sequences (HELD_OUT, length)): the last 10% of the text held out."""
    cut = int(0.9 * len(ids))
    test = ids[cut:]
    starts = torch.linspace(0, len(test) - length - 1, HELD_OUT).long()
    return ids[:cut], torch.stack([test[s : s + length] for s in starts])


@torch.no_grad()
def elbo_bits(logits_for_block, tokens: torch.Tensor, mask_id: int, seed: int) -> float:
    """Held-out MD4 bound in bits per character: per range of t, the ELBO term of the model that
    predicts there (``logits_for_block(block) -> logits_of(z, t)``), weighted by the range's width."""
    bounds = time_boundaries(EVAL_BLOCKS)
    total = 0.0
    gen = torch.Generator().manual_seed(10_000 + seed)
    repeated = tokens.repeat(DRAWS, 1)
    for a in range(EVAL_BLOCKS):
        lo, hi = bounds[a], bounds[a + 1]
        block = EVAL_BLOCKS - 1 - a  # block 0 holds the highest t
        term = block_loss(logits_for_block(block), repeated, mask_id, (lo, hi), "per-sample", gen)
        total += (hi - lo) * float(term)
    return total * BITS_PER_NAT


def train(technique: str, steps: int, seed: int, train_ids: torch.Tensor, length: int):
    torch.manual_seed(seed)
    spec = PRESETS["md4-tiny"]()
    tech = parse_technique(technique)
    if tech.is_diffusion_blocks:
        from dbprofile.methods.diffusion_blocks import DiffusionBlocksTrainer

        trainer = DiffusionBlocksTrainer.create(tech, spec, "cpu", lr=LR, seed=seed)
    else:
        trainer = make_trainer(tech, spec, torch.device("cpu"), lr=LR)
    for group in trainer.optimizer.param_groups:
        group["weight_decay"] = WEIGHT_DECAY
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(length)
    start = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(len(train_ids) - length, (BATCH, 1), generator=gen)
        trainer.step({"inputs": train_ids[starts + offsets]})
    return trainer, spec, time.perf_counter() - start


def evaluate(technique: str, trainer, spec, test: torch.Tensor, seed: int) -> tuple[float, list]:
    model = trainer.model
    model.eval()
    mask_id = spec.mask_token_id
    if not parse_technique(technique).is_diffusion_blocks:
        return elbo_bits(lambda _block: lambda z, _t: model(z), test, mask_id, seed), []
    bits = elbo_bits(
        lambda block: lambda z, t: model.masked_logits(z, t, model.block_layers[block]), test, mask_id, seed
    )
    return bits, held_out_block_losses(model, {"inputs": test}, seed=seed, draws=DRAWS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="e2e,db:2", help="comma-separated techniques")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=STEPS, help="end-to-end steps; db:B gets B times as many")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    length = PRESETS["md4-tiny"]().extra["sequence_length"]
    train_ids, test = split(text8_like(), length)
    results: dict[str, list[float]] = {}
    total = time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        for technique in args.runs.split(","):
            tech = parse_technique(technique)
            steps = args.steps * (tech.blocks if tech.is_diffusion_blocks else 1)
            trainer, spec, seconds = train(technique, steps, seed, train_ids, length)
            bits, blocks = evaluate(technique, trainer, spec, test, seed)
            results.setdefault(technique, []).append(bits)
            print(f"seed {seed} {technique}: held-out ELBO {bits:.3f} bits/char ({seconds:.0f} s, {steps} steps)")
            for block, (trained, zero) in enumerate(blocks):
                verdict = "learned" if trained < zero else "NOT LEARNED"
                print(f"  block {block}: held-out masked CE {trained:.4f} vs zero-init {zero:.4f} nats ({verdict})")
            if tech.is_diffusion_blocks:
                line = sample_masked(trainer.model, 1, length, generator=torch.Generator().manual_seed(seed))
                print("  sample: " + "".join(ALPHABET[int(i)] for i in line[0]))
    for technique, values in results.items():
        each = ", ".join(f"{v:.3f}" for v in values)
        print(f"mean {technique}: {sum(values) / len(values):.3f} bits/char ({each})")
    print(f"total: {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
