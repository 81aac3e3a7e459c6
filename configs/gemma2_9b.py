"""Gemma2-9B -> a student with a third of its layers (paper Sec. 3.2.2, Table 4).

Same widths as the teacher except a smaller MLP (~1.1B non-embedding parameters), embeddings
copied from the teacher and frozen, cosine loss on the final hidden states, TAD with K=10 and
beta=2, Adam lr 1e-4, weight decay 0.1, batch 128 x 2048 tokens, tau=1, 2B tokens. Set the paths:

  python scripts/train.py --config configs/gemma2_9b.py --workdir runs/gemma2_9b \
      --config.teacher.path=/ckpt/gemma-2-9b --config.data.train_files='/data/regmix/*.jsonl'

Vanilla KD / reverse KL: add --config.loss.divergence=kl (or rkl).
"""

from tad_jax.config import base_config
from tad_jax.models import STUDENT_OVERRIDES


def get_config():
    """The run config of this setup."""
    c = base_config()
    c.train_tokens = 2_000_000_000  # the paper's 2B-token budget.
    c.teacher.path = ""  # HF folder of google/gemma-2-9b (the pretrained, not instruction-tuned).
    c.teacher.preset = "gemma2-9b"  # architecture for --dry_run without a path.
    c.teacher.dtype = "bfloat16"  # the 9B teacher in bf16 (inference only); logits stay float32.
    # The 42 teacher layers as one scanned layer: on 2 v5p chips the step compiles in 126 CPU-s
    # instead of 189 and takes 31.7 GiB per device instead of 41.8 (loading stacks the
    # checkpoint's layers on the host first: ~18 GB of host memory). The student's 14 layers
    # scanned too: 76 CPU-s, 30.6 GiB (checkpoints, resume and the HF export unscan them); but at
    # one micro-batch it takes 103 GiB (unrolled 63.7), so opt.grad_accum_steps=0 picks 2.
    c.teacher.scan_layers = True  # the teacher's 42 layers as one scanned layer.
    c.student.scan_layers = True  # the student's 14 layers as one scanned layer too.
    # The paper's derived student (tad_jax.models.STUDENT_OVERRIDES, sized there).
    c.student.overrides = dict(STUDENT_OVERRIDES["gemma2-9b-student"][1])
    c.loss.divergence = "tad"  # TAD (Eq. 4); "kl" for the vanilla-KD baseline.
    c.loss.top_k = 10  # K (Sec. 3.2.2 states none: Table 1's value).
    c.loss.beta = 2.0  # beta (Sec. 3.2.2 states none: Table 1's value).
    # 256K vocabulary: the fused output heads + loss (tad_jax.fused) never materialise float32
    # [tokens, V] logits (most of the unfused step's temporaries); 512-token chunks. The dry run
    # counts FLOPs through its chunk loop. rkl / jsd run unfused (no fused kernel).
    c.loss.fused = True
    c.loss.chunk_size = 512  # tokens per chunk of the fused loss.
    c.loss.cosine_weight = 1.0  # cosine loss on final hidden states (Sec. 3.2.2; weight ours).
    c.opt.lr = 1e-4  # Adam learning rate (App. B).
    c.opt.weight_decay = 0.1  # weight decay (App. B).
    c.opt.grad_accum_steps = 16  # 128 sequences as 16 micro-batches of 8 (memory).
    # What the student's remat keeps (16 micro-batches, per device on 2 H100s / 2 v5p chips):
    # "nothing_saveable" 36.9 / 31.7 GiB, 8.0% more FLOPs than no remat; the projections'
    # outputs ("dots_with_no_batch_dims_saveable") 41.9 / 41.3 GiB, 1.4%; "dots_saveable" 56.8
    # (XLA attention keeps the scores) / 41.3 GiB, 0%. Switch when the step fits with room.
    c.student.remat_policy = "nothing_saveable"
    c.data.global_batch_size = 128  # sequences per optimizer step (App. B).
    c.data.seq_len = 2048  # context size (Sec. 3).
    c.data.train_files = ""  # Regmix sample (sail/regmix-data-sample) files, e.g. '/data/*.jsonl'.
    c.mesh.fsdp = -1  # shard the student and teacher over all devices (the paper used 2 H100s).
    c.mesh.data = 1  # no pure data parallelism (fsdp takes every device).
    c.dry_run.num_layers = 0  # the CPU test sets 3 (one student layer) to fit CI.
    return c
