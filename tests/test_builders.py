"""Tests of tad_jax.builders: the tokenizer check. Building the models is exercised by
test_step (the tiny models), test_train (teacher and student from HF folders) and test_dry_run."""

import pytest
from tiny_setup import tiny

from tad_jax.builders import check_tokenizers


def test_different_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, tok_dir = tiny.build_assets()
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(["a completely different corpus " * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=other).save_pretrained(tmp_path / "other")
    check_tokenizers({"teacher": tok_dir, "data": tok_dir}, 512)  # one tokenizer: fine
    with pytest.raises(ValueError, match="teacher and student tokenizers differ"):
        check_tokenizers({"teacher": tok_dir, "student": str(tmp_path / "other")}, 256)
