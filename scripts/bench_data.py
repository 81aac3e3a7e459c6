"""Tokens per second of the training data pipeline on a real corpus, with 0, 1 and 2 workers.

    python scripts/bench_data.py --tokenizer ~/.cache/tad_jax/smollm2-135m-instruct \
        --files /usr/share/info/python3.11.info.gz --workers 0 1 2

Prints one JSON object: per worker count, the seconds to the first batch and the rate after it
(row tokens per second, and the tokens that count in the loss per second).
"""

import argparse
import json
import os
import time

from tad_jax.data import default_data_config, make_train_iterator

_SMOLLM2 = os.path.expanduser("~/.cache/tad_jax/smollm2-135m-instruct")


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", default="/usr/share/info/python3.11.info.gz")
    p.add_argument("--tokenizer", default=_SMOLLM2, help="local HF tokenizer folder")
    p.add_argument("--mode", default="pretrain", choices=["pretrain", "sft"])
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=200, help="batches timed per worker count")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--read_threads", type=int, default=2)
    p.add_argument("--prepared_dir", default="", help="read a scripts/prepare_data.py folder")
    return p.parse_args()


def bench(cfg, batches: int) -> dict:
    """Seconds to build the iterator and get a first batch, then tokens/s over ``batches``."""
    start = time.perf_counter()
    it = make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
    next(it)
    first = time.perf_counter() - start
    start, valid = time.perf_counter(), 0.0
    for _ in range(batches):
        valid += float(next(it)["loss_mask"].sum())
    seconds = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()
    rows = batches * cfg.global_batch_size * cfg.seq_len
    return {"workers": cfg.num_workers, "first_batch_s": round(first, 2),
            "tokens_per_s": round(rows / seconds), "loss_tokens_per_s": round(valid / seconds)}


def main():
    args = _args()
    cfg = default_data_config()
    cfg.update(dict(mode=args.mode, train_files=args.files, tokenizer=args.tokenizer,
                    seq_len=args.seq_len, global_batch_size=args.batch_size,
                    read_threads=args.read_threads, prepared_dir=args.prepared_dir))
    results = []
    for workers in args.workers:
        cfg.num_workers = workers
        results.append(bench(cfg, args.batches))
    print(json.dumps({"files": args.prepared_dir or args.files, "tokenizer": args.tokenizer,
                      "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "cpus": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
