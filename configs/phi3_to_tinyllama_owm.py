"""Phi-3-mini -> TinyLlama-1.1B, continued pretraining on OpenWebMath (paper Sec. 3.4, stage 1).

The student is the pretrained TinyLlama (2.5T-token checkpoint), every parameter trained.
Phi-3's embedding is padded to 32064 entries; both share the Llama tokenizer's first 32000, so the
teacher's logits are sliced to 32000. TAD beta=2 K=10, Adam lr 3e-5, weight decay 0.1,
batch 128 x 2048, 2.5B tokens.
"""

from tad_jax.config import base_config


def get_config():
    """The run config of this setup."""
    c = base_config()
    c.train_tokens = 2_500_000_000  # 2.5B OWM tokens.
    c.teacher.path = ""  # HF folder of microsoft/Phi-3-mini-4k-instruct.
    c.teacher.preset = "phi-3-mini"  # architecture for --dry_run without a path.
    c.teacher.dtype = "bfloat16"  # teacher weights in bf16 (inference only).
    c.teacher.scan_layers = True  # one scanned layer: faster compiles, less memory (gemma2_9b).
    # HF folder of the 2.5T-token TinyLlama checkpoint the paper starts from (Sec. 3.3),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1195k-token-2.5T.
    c.student.path = ""
    c.student.preset = "tinyllama-1.1b"  # student architecture for --dry_run without a path.
    c.loss.divergence = "tad"  # TAD; "kl" for vanilla KD.
    c.loss.top_k = 10  # K.
    c.loss.beta = 2.0  # beta (Sec. 3.4, stage 1: 2.0).
    c.loss.vocab_size = 32000  # the shared Llama tokenizer (Phi-3 pads to 32064).
    # Fused output heads + loss in token chunks (tad_jax.fused): no float32 [tokens, V] logits;
    # the dry run counts FLOPs through its chunk loop. rkl / jsd run unfused (no fused kernel).
    c.loss.fused = True
    c.opt.lr = 3e-5  # Adam learning rate for continued pretraining (App. B).
    c.opt.weight_decay = 0.1  # weight decay.
    # 0: the fewest micro-batches whose compiled step fits the devices' memory (tad_jax.aot);
    # fixed: e.g. --config.opt.grad_accum_steps=8 (128 sequences as 8 micro-batches of 16).
    c.opt.grad_accum_steps = 0
    c.data.global_batch_size = 128  # sequences per step.
    c.data.seq_len = 2048  # context size.
    c.data.train_files = ""  # OpenWebMath files (open-web-math/open-web-math parquet).
    return c
