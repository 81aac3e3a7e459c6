"""Phi-3-mini -> TinyLlama, supervised distillation on ORCAMEL (paper Sec. 3.4, stage 2).

ORCAMEL is the paper's mix of Microsoft's ORCA-Math 200K and Camel-AI's math 50K problems. Starts
from the stage-1 student (configs/phi3_to_tinyllama_owm.py exported to HF). Prompt tokens are
masked out of the loss; batch 32 x 2048, Adam lr 1e-5, weight decay 0.1, three epochs (App. B,
Sec. 3.4): one example per row, so a step sees 32 examples and three epochs are 3 x 250K / 32
steps. Packing several examples per row (--config.data.pack=True) is faster, but then a step
sees more than 32 examples and three epochs take fewer steps than `steps` says; the run stops
when the data's three epochs end (`data.num_epochs`).
"""

from tad_jax.config import base_config


def get_config():
    """The run config of this setup."""
    c = base_config()
    # Three epochs of ORCAMEL's ~250K examples at 32 per step: 3 * len(train) / 32. The run stops,
    # evaluated and saved, where data.num_epochs = 3 epochs end: a little earlier, as
    # data.val_fraction holds 1% out (or set data.val_files).
    c.steps = 23_438
    c.teacher.path = ""  # HF folder of microsoft/Phi-3-mini-4k-instruct.
    c.teacher.preset = "phi-3-mini"  # architecture for --dry_run without a path.
    c.teacher.dtype = "bfloat16"  # teacher weights in bf16 (inference only).
    c.teacher.scan_layers = True  # one scanned layer: faster compiles, less memory (gemma2_9b).
    c.student.path = ""  # HF folder of the stage-1 student (scripts/export_hf.py output).
    c.student.preset = "tinyllama-1.1b"  # student architecture for --dry_run without a path.
    c.loss.divergence = "tad"  # TAD; "kl" for vanilla KD.
    c.loss.top_k = 10  # K.
    c.loss.beta = 2.0  # beta.
    # X of Eq. 3 = one example: its row here (data.pack=False), its segment if packed.
    c.loss.beta_scope = "segment"
    c.loss.vocab_size = 32000  # the shared Llama tokenizer (Phi-3 pads to 32064).
    # Fused output heads + loss in token chunks (tad_jax.fused): no float32 [tokens, V] logits;
    # the dry run counts FLOPs through its chunk loop. rkl / jsd run unfused (no fused kernel).
    c.loss.fused = True
    c.opt.lr = 1e-5  # Adam learning rate for supervised distillation (App. B).
    c.opt.weight_decay = 0.1  # weight decay.
    c.opt.warmup_steps = 50  # short warmup: the student is already trained (not in the paper).
    # 0: the fewest micro-batches whose compiled step fits the devices' memory (tad_jax.aot);
    # fixed: e.g. --config.opt.grad_accum_steps=2 (32 sequences as 2 micro-batches of 16).
    c.opt.grad_accum_steps = 0
    c.data.mode = "sft"  # prompt/response records; only response tokens count.
    c.data.global_batch_size = 32  # examples per step (App. B), one per row (data.pack).
    c.data.seq_len = 2048  # context size (App. B).
    c.data.pack = False  # one padded example per row: batch 32 = 32 examples, as the paper.
    c.data.num_epochs = 3  # three epochs of distillation (Sec. 3.4); the run stops there.
    # ORCAMEL JSONL files: microsoft/orca-math-word-problems-200k and camel-ai/math (50K), as
    # prompt/response or messages records.
    c.data.train_files = ""
    return c
