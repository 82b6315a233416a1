"""DataBundle over prepared datasets: preparation on first use, blending, validation splits, extra validation
text. Called through data.build_data(cfg.data, seed) when data.kind == "prepared"."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .blend import BlendedSource
from .dist import distributed, rank as process_rank
from .shards import (ArrayShard, DataError, PreparedDataset, TokenStream, framed_source, read_meta,
                     resolve_path)
from .source import DataBundle


def ensure_prepared(cfg) -> None:
    """Run data.prepare for the recipe's source when its folder does not exist yet (rank 0 only; the other
    ranks wait). With the folder present, its recorded settings must match the recipe's."""
    from .prepare import PrepareJob, prepare
    out = resolve_path(cfg.sources[0].path)
    job = PrepareJob.from_config(cfg.prepare)
    rank, multi = process_rank(), distributed()
    if rank == 0:
        if not (out / "meta.json").is_file():
            print(f"preparing {out} on first use (python -m data.prepare does the same; later runs reuse it)")
        prepare(job, out, workers=cfg.prepare.workers, progress=True)
    if multi and rank != 0:
        # Wait on the file, not in a collective: preparing a large corpus takes longer than a process group's
        # timeout (10 minutes for NCCL). Better still, prepare before the job (python -m launch.prepare_data;
        # the slurm template does).
        import os
        import time
        limit = float(os.environ.get("UNMASK_PREPARE_WAIT_S", 24 * 3600))
        t0 = time.monotonic()
        while not (out / "meta.json").is_file():
            if time.monotonic() - t0 > limit:
                raise DataError(f"rank {rank} waited {limit:.0f} s for rank 0 to prepare {out}; prepare it before "
                                f"the job with python -m launch.prepare_data --config ... (or raise "
                                f"UNMASK_PREPARE_WAIT_S)")
            time.sleep(5)
    if multi:
        import torch.distributed as dist
        dist.barrier()  # everyone past preparation: returns at once
    if rank != 0:
        read_meta(out)


def _extra_valid(path_str: str, tok, doc_split: str, L: int, fingerprint: str, framing: str = "packed"):
    """A validation source from a text file (tokenized now with the data's tokenizer), or a prepared folder."""
    from .inputs import InputSpec, iter_documents
    from .tokenizer import DocumentEncoder
    path = resolve_path(path_str)
    if not path.exists():
        raise DataError(f"data.extra_valid file {path_str} does not exist (looked in {Path.cwd()} and the "
                        f"repository root)")
    if path.is_dir():
        ds = PreparedDataset(path)
        if ds.fingerprint != fingerprint:
            raise DataError(f"data.extra_valid {path_str} was tokenized with tokenizer {ds.fingerprint}, the "
                            f"training data with {fingerprint}: prepare it with the training data's tokenizer.json")
        stream = TokenStream(ds.shards, ds.doc_runs(0, ds.num_docs))
    else:
        docs = list(iter_documents(InputSpec(inputs=[str(path)], doc_split=doc_split), files=[path]))
        if not docs:
            raise DataError(f"data.extra_valid file {path_str} holds no text")
        flat, lengths = DocumentEncoder(tok.tok.to_str(), tok.eos_id).encode_docs(docs)
        shard = ArrayShard(flat.astype(np.int64), lengths)
        stream = TokenStream([shard], [(0, 0, shard.num_tokens)])
    src = framed_source(stream, L, framing, tok, name=path.name)
    if src.num_samples == 0:
        raise DataError(f"data.extra_valid {path_str} has {stream.num_tokens} tokens, fewer than one sequence of "
                        f"data.seq_len={L}")
    return src


def _valid_name(path_str: str, taken: set) -> str:
    p = Path(path_str)
    name = p.name if p.is_dir() else (p.stem if p.suffix in (".txt", ".tokens", ".raw", ".jsonl", ".json") else p.name)
    base, i = name, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def build_prepared(cfg, seed: int) -> DataBundle:
    """cfg: pretrain.config.DataConfig with kind == "prepared"."""
    if not cfg.sources:
        raise DataError("data.kind=prepared needs data.sources: a list of {path, weight}")
    if cfg.prepare is not None:
        ensure_prepared(cfg)
    L = cfg.seq_len
    datasets = []
    for i, s in enumerate(cfg.sources):
        datasets.append(PreparedDataset(resolve_path(s.path), reader=s.reader))
    first = datasets[0]
    for i, ds in enumerate(datasets[1:], 1):
        if ds.fingerprint != first.fingerprint:
            raise DataError(f"data.sources[{i}] ({cfg.sources[i].path}) was tokenized with tokenizer "
                            f"{ds.fingerprint}, data.sources[0] ({cfg.sources[0].path}) with {first.fingerprint}: "
                            f"blended datasets must share one tokenizer. Prepare it again with "
                            f"--tokenizer {first.folder / 'tokenizer.json'}")
    tok = first.tokenizer
    framing = getattr(cfg, "framing", "packed")  # wrapped: MDLM's [BOS] + L-2 + [EOS] training blocks

    names = [Path(s.path).name for s in cfg.sources]
    trains, valids = [], []
    for name, ds in zip(names, datasets):
        train_stream, valid_stream = ds.split(cfg.valid_fraction)
        train = framed_source(train_stream, L, framing, tok, name=name)
        if train.num_samples == 0:
            raise DataError(f"{ds.folder} has {train_stream.num_tokens} training tokens, fewer than one sequence "
                            f"of data.seq_len={L}")
        trains.append(train)
        if cfg.valid_fraction > 0:
            valid = framed_source(valid_stream, L, framing, tok, name=name + " (held out)")
            if valid.num_samples == 0:
                raise DataError(f"data.valid_fraction={cfg.valid_fraction} holds out {valid_stream.num_tokens} tokens "
                                f"of {ds.folder}, fewer than one sequence of {L}: raise it")
            valids.append(valid)
    weights = [s.weight for s in cfg.sources]
    if len(trains) == 1:
        train_src = trains[0]
    else:
        train_src = BlendedSource(trains, weights, seed, names=names)
    if getattr(cfg, "unique_tokens", 0):  # data-constrained runs repeat the first U unique tokens (data/repeat.py)
        from .repeat import cap_unique_tokens
        train_src = cap_unique_tokens(train_src, cfg.unique_tokens, seed)

    valid: dict = {}
    if valids:
        # Validation ignores the training seed (seed 0), so runs with different seeds compare on one set.
        valid["valid"] = valids[0] if len(valids) == 1 else BlendedSource(valids, weights, 0, names=names)
    for path_str in cfg.extra_valid:
        valid[_valid_name(path_str, set(valid))] = _extra_valid(path_str, tok, cfg.extra_valid_doc_split, L,
                                                                first.fingerprint, framing)
    if not valid:
        raise DataError("no validation data: set data.valid_fraction > 0 or list text files in data.extra_valid")

    total = sum(ds.num_tokens for ds in datasets)
    parts = []
    for name, ds, tr, w in zip(names, datasets, trains, weights):
        parts.append(f"{name}: {ds.num_tokens:,} tokens in {ds.num_docs:,} docs -> {tr.num_samples:,} train "
                     f"samples" + (f", weight {w:g}" if len(datasets) > 1 else ""))
    if getattr(cfg, "unique_tokens", 0):
        parts.append(f"training capped at {train_src.num_samples * L:,} unique tokens, repeated")
    desc = (f"prepared data, {total:,} tokens ({'; '.join(parts)}); seq_len {L}, documents packed with EOS "
            + ("into [BOS] + L-2 + [EOS] blocks (wrapped)" if framing == "wrapped" else "and a document mask")
            + "; validation: " + ", ".join(
                f"{k} {v.num_samples:,}" if v.num_samples is not None else f"{k} (blend)" for k, v in valid.items())
            + f" samples; tokenizer {first.meta['tokenizer'].get('spec', '?')} ({tok.vocab_size} ids, "
            f"mask {tok.mask_id}, eos {tok.eos_id}, fingerprint {tok.fingerprint})")
    return DataBundle(
        train=train_src, valid=valid, vocab_size=tok.vocab_size, mask_id=tok.mask_id, eos_id=tok.eos_id,
        decode=tok.decode, encode=tok.encode, description=desc,
        info={"tokenizer": tok, "fingerprint": tok.fingerprint,
              "sources": [{"path": str(ds.folder), "tokens": ds.num_tokens, "docs": ds.num_docs,
                           "train_samples": tr.num_samples} for ds, tr in zip(datasets, trains)],
              "train_samples": train_src.num_samples},
    )
