"""Decoding evaluation of a trained seq2seq run: exact match and corpus BLEU, greedy and beam.

The trainer's periodic evaluation already reports greedy exact match on device; this
module decodes the held-out set on the host side too, turns the ids back into text and
scores it with sacrebleu, for greedy decoding and for beam search:

    bigmodel evaluate-seq2seq --workdir runs/seq2seq [--beam_size 4]

It runs on one process and writes WORKDIR/seq2seq_eval.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import ml_collections

    from bigmodel.models import transformer

# JAX, orbax and the models are imported inside the functions: `bigmodel` imports this
# module for its command line, and other commands should not pay for them.


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """Corpus BLEU (0-100, sacrebleu) of detokenised hypotheses against one reference each."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    # effective_order only matters when the hypotheses hold no n-grams of some order (a
    # corpus of 1-3 character answers); standard BLEU is then a degenerate 0. With n-grams
    # of every order present, as in any translation corpus, the score is sacrebleu's usual one.
    bleu = sacrebleu.BLEU(tokenize=tokenize, effective_order=True)
    return float(bleu.corpus_score(list(hypotheses), [list(references)]).score)


def until_eos(ids: Sequence[int], eos: int) -> list[int]:
    """Ids up to and including the first EOS (all of them if there is none), padding dropped."""
    out = []
    for i in ids:
        i = int(i)
        if i == 0:
            continue
        out.append(i)
        if i == eos:
            break
    return out


def make_decoder(module: transformer.Transformer, max_len: int, bos: int, eos: int, beam_size: int) -> Callable:
    """jit (params, src [B,S]) -> tokens [B, max_len]: greedy for beam_size 1, else the best beam."""
    import jax

    from bigmodel.models import transformer

    if beam_size <= 1:
        return jax.jit(lambda params, src: transformer.greedy_decode(module, params, src, max_len, bos, eos))
    return jax.jit(
        lambda params, src: transformer.beam_search(module, params, src, beam_size, max_len, bos, eos)[0][:, 0]
    )


def decode(decoder: Callable, params: Any, sources: np.ndarray, batch_size: int) -> np.ndarray:
    """Decode [N,S] sources in batches of one fixed shape (the last is padded with copies of row 0)."""
    import jax.numpy as jnp

    out = []
    for start in range(0, len(sources), batch_size):
        chunk = sources[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
        out.append(np.asarray(decoder(params, jnp.asarray(chunk)))[: batch_size - pad])
    return np.concatenate(out)


def score(tokenizer: Any, decoded: np.ndarray, targets: np.ndarray, references: Sequence[str], eos: int,
          bleu_tokenize: str) -> dict[str, Any]:
    """Exact match (ids up to EOS equal the target's) and corpus BLEU of the decoded text."""
    hyp_ids = [until_eos(row, eos) for row in decoded]
    ref_ids = [until_eos(row, eos) for row in targets]
    hypotheses = [tokenizer.decode([i for i in ids if i != eos]) for ids in hyp_ids]
    return {
        "exact_match": float(np.mean([h == r for h, r in zip(hyp_ids, ref_ids)])),
        "bleu": corpus_bleu(hypotheses, references, bleu_tokenize),
        "hypotheses": hypotheses,
    }


def load_params(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, Any, int]:
    """(config, params as host arrays, step) of a workdir's checkpoint (latest by default)."""
    import jax
    import ml_collections

    from bigmodel import checkpoint

    path = pathlib.Path(workdir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{workdir} has no config.json; is it a bigmodel workdir?")
    config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    if config.task != "seq2seq":
        raise ValueError(f"{workdir} trained task {config.task!r}; evaluate-seq2seq needs a seq2seq run")
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    try:
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet; train first")
        params = jax.tree.map(np.asarray, ckpt.restore_raw(step)["params"])
    finally:
        ckpt.close()
    return config, params, step


def evaluate_workdir(workdir: str, beam_size: int = 4, step: int | None = None, batch_size: int | None = None,
                     show: int = 3) -> dict[str, Any]:
    """Greedy and beam-search exact match and BLEU on the held-out set; printed and saved to seq2seq_eval.json."""
    from bigmodel import models
    from bigmodel.data import seq2seq

    config, params, step = load_params(workdir, step)
    module = models.build(config.model)
    probs = seq2seq.problems(config)
    cfg = config.data
    batch = seq2seq.encode_batch(probs.tokenizer, probs.eval, cfg)
    references = [target for _, target in probs.eval]
    batch_size = batch_size or config.eval.batch_size
    results: dict[str, Any] = {"step": step, "examples": len(probs.eval), "dataset": probs.dataset_id,
                               "beam_size": beam_size}
    for name, beams in (("greedy", 1), ("beam", beam_size)):
        decoder = make_decoder(module, cfg.target_len, cfg.bos_id, cfg.eos_id, beams)
        decoded = decode(decoder, params, batch["inputs"], batch_size)
        scored = score(probs.tokenizer, decoded, batch["targets"], references, cfg.eos_id, probs.bleu_tokenize)
        results[f"{name}_exact_match"] = scored["exact_match"]
        results[f"{name}_bleu"] = scored["bleu"]
        results[f"{name}_examples"] = [
            {"source": s, "reference": r, "hypothesis": h}
            for (s, r), h in zip(probs.eval[:show], scored["hypotheses"][:show])
        ]
    summary = {k: v for k, v in results.items() if not k.endswith("_examples")}
    pathlib.Path(workdir, "seq2seq_eval.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"{workdir} step {step}, {results['examples']} held-out examples of {probs.dataset_id}:")
    for name in ("greedy", f"beam (size {beam_size})"):
        key = name.split()[0]
        print(f"  {name:<16} exact match {100 * summary[f'{key}_exact_match']:6.2f}%   "
              f"BLEU {summary[f'{key}_bleu']:6.2f} ({probs.bleu_tokenize})")
    for ex in results["beam_examples"]:
        print(f"  {ex['source']!r} -> {ex['hypothesis']!r} (reference {ex['reference']!r})")
    return summary


def cmd_evaluate(args: argparse.Namespace) -> int:
    """The `evaluate-seq2seq` command."""
    evaluate_workdir(args.workdir, beam_size=args.beam_size, step=args.step, batch_size=args.batch_size)
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `evaluate-seq2seq` command to a `bigmodel` sub-parser set."""
    p = subparsers.add_parser(
        "evaluate-seq2seq", help="exact match and BLEU of greedy and beam-search decodes of a seq2seq run",
        description="Restore a seq2seq workdir's checkpoint, decode its held-out set greedily and with beam "
                    "search, and print exact match and corpus BLEU (also written to WORKDIR/seq2seq_eval.json).")
    p.add_argument("--workdir", required=True)
    p.add_argument("--beam_size", "--beam-size", type=int, default=4)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=None,
                   help="decoding batch (default: config.eval.batch_size)")
    p.set_defaults(func=cmd_evaluate)
    return p
