"""A tiny, self-contained run for tests and smoke checks: no downloads, no checkpoints.

A random 2-layer Llama teacher (vocabulary 512, width 64), a 1-layer student initialised from it,
a slice of Debian's Python manual (or the licence texts) as corpus, and a byte-level BPE tokenizer
trained on that slice. Both are built once into `$TAD_JAX_CACHE/tiny` (default
`~/.cache/tad_jax/tiny`) when the config is loaded. 30 steps take seconds on one CPU.
"""

import os
import pathlib

from tad_jax.config import base_config

VOCAB = 512  # tokenizer and model vocabulary.
CORPUS_CHARS = 400_000  # characters of the corpus slice (~120k tokens).


def get_config():
    """The run config of the tiny setup."""
    corpus, tokenizer = build_assets()
    c = base_config()
    c.steps = 30  # optimizer steps.
    c.teacher.model = dict(  # ModelConfig fields of the random teacher.
        model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    c.teacher.random_init = True  # no teacher checkpoint: a random teacher.
    c.student.overrides = dict(num_layers=1)  # the teacher's widths, one layer.
    c.student.remat = False  # nothing to save at this size.
    c.loss.divergence = "tad"  # TAD; --config.loss.divergence=kl for vanilla KD.
    c.loss.top_k = 10  # K.
    c.loss.beta = 2.0  # beta.
    c.opt.lr = 3e-3  # high, so that 30 steps show the loss falling.
    c.opt.warmup_steps = 3  # linear warmup steps.
    c.data.train_files = corpus  # the corpus slice.
    c.data.tokenizer = tokenizer  # the locally trained tokenizer.
    c.data.seq_len = 32  # tokens per row.
    c.data.global_batch_size = 8  # rows per step.
    c.data.val_fraction = 0.1  # documents held out for evaluation.
    c.data.text_chunk_chars = 2000  # documents of ~2000 characters.
    c.ckpt.every_steps = 10  # checkpoint every 10 steps.
    c.ckpt.async_save = False  # synchronous saves: tests kill the process at arbitrary points.
    c.eval.every_steps = 10  # evaluate every 10 steps.
    c.eval.batch_size = 8  # rows per evaluation batch.
    c.eval.max_batches = 2  # evaluation batches.
    c.log.every_steps = 1  # a metrics.jsonl record per step.
    c.log.tensorboard = True  # TensorBoard scalars too.
    return c


def build_assets(cache_dir=None):
    """(corpus file, tokenizer folder) of the tiny setup, built once and cached.

    Args:
      cache_dir: where to build; default `$TAD_JAX_CACHE/tiny` or `~/.cache/tad_jax/tiny`.
    """
    root = pathlib.Path(cache_dir or os.environ.get("TAD_JAX_CACHE", "~/.cache/tad_jax"))
    root = root.expanduser() / "tiny"
    corpus, tok_dir = root / "corpus.txt", root / "tokenizer"
    if not corpus.is_file():
        _write_atomic(corpus, _corpus_slice())
    if not (tok_dir / "tokenizer.json").is_file():
        _train_tokenizer(corpus.read_text(), tok_dir)
    return str(corpus), str(tok_dir)


def _corpus_slice() -> str:
    from tad_jax import assets

    text = "".join(assets.read_text(p) for p in assets.corpus_files())
    return text[:CORPUS_CHARS]


def _write_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: concurrent test processes never see half a file


def _train_tokenizer(text: str, out_dir: pathlib.Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos).save_pretrained(tmp)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process won the race; its folder is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
