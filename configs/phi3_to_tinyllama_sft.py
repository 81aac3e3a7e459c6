"""Phi-3-mini -> TinyLlama, supervised distillation on ORCA-Math (paper Sec. 3.3, stage 2).

Starts from the stage-1 student (configs/phi3_to_tinyllama_owm.py exported to HF). Prompt tokens
are masked out of the loss; batch 32 x 2048, Adam lr 1e-5, weight decay 0.1, three epochs.
"""

from tad_jax.config import base_config


def get_config():
    """The run config of this setup."""
    c = base_config()
    # Three epochs of ORCA-Math's ~200k problems at 32 per step: set to 3 * len(train) / 32.
    c.steps = 18_750
    c.teacher.path = ""  # HF folder of microsoft/Phi-3-mini-4k-instruct.
    c.teacher.preset = "phi-3-mini"  # architecture for --dry_run without a path.
    c.teacher.dtype = "bfloat16"  # teacher weights in bf16 (inference only).
    c.teacher.scan_layers = True  # one scanned layer: faster compiles, less memory (gemma2_9b).
    c.student.path = ""  # HF folder of the stage-1 student (scripts/export_hf.py output).
    c.student.preset = "tinyllama-1.1b"  # student architecture for --dry_run without a path.
    c.loss.divergence = "tad"  # TAD; "kl" for vanilla KD.
    c.loss.top_k = 10  # K.
    c.loss.beta = 2.0  # beta.
    c.loss.beta_scope = "segment"  # X of Eq. 3 = one packed example, not the whole packed row.
    c.loss.vocab_size = 32000  # the shared Llama tokenizer (Phi-3 pads to 32064).
    # Fused output heads + loss in token chunks (tad_jax.fused): no float32 [tokens, V] logits;
    # the dry run counts FLOPs through its chunk loop. rkl / jsd run unfused (no fused kernel).
    c.loss.fused = True
    c.opt.lr = 1e-5  # Adam learning rate for supervised distillation (App. B).
    c.opt.weight_decay = 0.1  # weight decay.
    c.opt.warmup_steps = 50  # short warmup: the student is already trained.
    # 0: the fewest micro-batches whose compiled step fits the devices' memory (tad_jax.aot);
    # fixed: e.g. --config.opt.grad_accum_steps=2 (32 sequences as 2 micro-batches of 16).
    c.opt.grad_accum_steps = 0
    c.data.mode = "sft"  # prompt/response records; only response tokens count.
    c.data.global_batch_size = 32  # sequences per step (App. B).
    c.data.seq_len = 2048  # context size (App. B).
    c.data.train_files = ""  # ORCA-Math JSONL (microsoft/orca-math-word-problems-200k).
    return c
