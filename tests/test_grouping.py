"""The scripts' array-based group_texts cuts exactly the blocks of the straightforward list-chaining version.

Both scripts concatenate a batch of tokenized texts and cut it into blocks of block_size tokens, dropping the
remainder of each batch; run_clm.py also adds labels equal to the input ids. The reference below does the same
with plain Python lists, as the Hugging Face examples do, and every case must give the same blocks in the same
order: random text lengths and block sizes (hypothesis), remainders, empty texts, empty batches, and batches of
the size `datasets` hands over.
"""

from itertools import chain

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import run_clm
import run_mlm


def chained_blocks(examples, block_size):
    """Chain each column's lists into one, cut it every block_size tokens and drop what is left over."""
    concatenated = {key: list(chain.from_iterable(sequences)) for key, sequences in examples.items()}
    usable = len(concatenated["input_ids"]) // block_size * block_size
    return {
        key: [tokens[i:i + block_size] for i in range(0, usable, block_size)] for key, tokens in concatenated.items()
    }


def tokenized_batch(lengths, first_id=0):
    """A batch as `datasets` hands it over: per column, one list per text, of the given lengths.

    The ids count up through the batch, so a token out of place or order shows; the other columns follow
    different patterns, so a mixed-up column shows too.
    """
    ids = np.arange(first_id, first_id + sum(lengths))
    starts = np.cumsum([0, *lengths])
    columns = {"input_ids": ids, "attention_mask": ids % 3 != 0, "special_tokens_mask": ids % 5 == 0}
    return {
        key: [values[a:b].astype(int).tolist() for a, b in zip(starts, starts[1:])] for key, values in columns.items()
    }


def as_lists(groups):
    # The scripts return arrays of shape (blocks, block_size), the reference lists of lists.
    return {key: np.asarray(blocks).tolist() for key, blocks in groups.items()}


def check_same_blocks(lengths, block_size, first_id=0):
    batch = tokenized_batch(lengths, first_id)
    mlm_expected = chained_blocks(batch, block_size)
    assert as_lists(run_mlm.group_texts(batch, block_size)) == mlm_expected
    clm_batch = {key: batch[key] for key in ("input_ids", "attention_mask")}
    clm_expected = {**chained_blocks(clm_batch, block_size), "labels": mlm_expected["input_ids"]}
    assert as_lists(run_clm.group_texts(clm_batch, block_size)) == clm_expected


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 50), max_size=40),
    block_size=st.integers(1, 64),
    first_id=st.integers(0, 2**31 - 10_000),
)
@example(lengths=[], block_size=4, first_id=0)  # an empty batch
@example(lengths=[0, 0], block_size=4, first_id=0)  # only empty texts
@example(lengths=[3], block_size=4, first_id=0)  # less than one block: nothing
@example(lengths=[2, 4], block_size=3, first_id=0)  # exactly two blocks across a text boundary
@example(lengths=[3, 5, 1], block_size=4, first_id=0)  # two blocks and a remainder of one
def test_group_texts_matches_list_chaining(lengths, block_size, first_id):
    check_same_blocks(lengths, block_size, first_id)


@pytest.mark.parametrize("seed", range(3))
def test_group_texts_matches_list_chaining_on_full_size_batches(seed):
    # 1000 texts per batch, as `datasets` maps by default, from empty lines to long paragraphs.
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 300, size=1000).tolist()
    check_same_blocks(lengths, block_size=int(rng.choice([128, 256, 1024])))
