"""Phi-2 (2.8B) -> a student with half its layers (paper Sec. 3.2.2, Table 4).

Same width as the teacher, a smaller MLP (~1B non-embedding parameters), embeddings copied and
frozen, cosine loss on the final hidden states, TAD K=10 beta=2, Adam lr 1e-4, weight decay 0.1,
batch 128 x 2048, 2B tokens. Vanilla KD / reverse KL: --config.loss.divergence=kl (or rkl).
"""

from tad_jax.config import base_config
from tad_jax.models import STUDENT_OVERRIDES


def get_config():
    """The run config of this setup."""
    c = base_config()
    c.train_tokens = 2_000_000_000  # 2B tokens (Table 4).
    c.teacher.path = ""  # HF folder of microsoft/phi-2.
    c.teacher.preset = "phi-2"  # architecture for --dry_run without a path.
    c.teacher.dtype = "bfloat16"  # teacher weights in bf16 (inference only).
    c.teacher.scan_layers = True  # one scanned layer: faster compiles, less memory (gemma2_9b).
    # The paper's derived student (tad_jax.models.STUDENT_OVERRIDES, sized there).
    c.student.overrides = dict(STUDENT_OVERRIDES["phi-2-student"][1])
    c.loss.divergence = "tad"  # TAD; "kl" for vanilla KD, "rkl" for reverse KL.
    c.loss.top_k = 10  # K (Sec. 3.2.2 states none: Table 1's value).
    c.loss.beta = 2.0  # beta (Sec. 3.2.2 states none: Table 1's value).
    c.loss.cosine_weight = 1.0  # cosine loss on final hidden states (Sec. 3.2.2; weight ours).
    c.loss.vocab_size = 50295  # Phi-2's tokenizer size (its embedding is padded to 51200).
    # Fused output heads + loss in token chunks (tad_jax.fused): no float32 [tokens, V] logits;
    # the dry run counts FLOPs through its chunk loop. rkl / jsd run unfused (no fused kernel).
    c.loss.fused = True
    c.opt.lr = 1e-4  # Adam learning rate.
    c.opt.weight_decay = 0.1  # weight decay.
    # 0: the fewest micro-batches whose compiled step fits the devices' memory (tad_jax.aot);
    # fixed: e.g. --config.opt.grad_accum_steps=8 (128 sequences as 8 micro-batches of 16).
    c.opt.grad_accum_steps = 0
    c.data.global_batch_size = 128  # sequences per step.
    c.data.seq_len = 2048  # context size.
    c.data.train_files = ""  # Regmix sample files.
    return c
