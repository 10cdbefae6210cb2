"""The scripts' array-based group_texts cuts exactly the blocks of the straightforward list-chaining version.

Both scripts concatenate a batch of tokenized texts (an Arrow table, as `datasets` hands it over in Arrow format)
and cut it into blocks of block_size tokens, dropping the remainder of each batch, with an attention mask of ones;
run_clm.py also adds labels equal to the input ids, but -100 for each block's first token. The reference
(tools/list_chaining.py) does the same with plain Python lists, as the Hugging Face examples do with the tokenizer's
attention masks, and every
case must give the same blocks in the same order: random text lengths and block sizes (hypothesis), remainders,
empty texts, empty batches, and batches of the size `datasets` hands over. And a file given as both training and
validation data is grouped once.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import tiny_run_arguments
from hypothesis import example, given, settings
from hypothesis import strategies as st
from list_chaining import chained_group_texts

import run_clm
import run_mlm
from lmtune.data import concatenate_and_cut

# The function each script hands tokenize_and_group to cut blocks: run_clm's adds its labels.
GROUPING = {"run_clm": "group_texts", "run_mlm": "concatenate_and_cut"}


def tokenized_batch(lengths, first_id=0):
    """A batch as the tokenizer makes it: per column, one list per text, of the given lengths.

    The ids count up through the batch, so a token out of place or order shows; the special-tokens mask follows
    another pattern, so a mixed-up column shows too. The attention mask is all ones, as for any unpadded text.
    """
    ids = np.arange(first_id, first_id + sum(lengths))
    starts = np.cumsum([0, *lengths])
    columns = {"input_ids": ids, "attention_mask": np.ones_like(ids), "special_tokens_mask": ids % 5 == 0}
    return {
        key: [values[a:b].astype(int).tolist() for a, b in zip(starts, starts[1:])] for key, values in columns.items()
    }


def as_arrow(batch, columns):
    """The batch without its attention mask, which the scripts do not tokenize, as an Arrow table."""
    return pa.table({key: pa.array(batch[key], type=pa.list_(pa.int32())) for key in columns})


def as_lists(table):
    return {name: table.column(name).to_pylist() for name in table.column_names}


def check_same_blocks(lengths, block_size, first_id=0):
    batch = tokenized_batch(lengths, first_id)
    mlm_expected = chained_group_texts(batch, block_size)
    assert as_lists(concatenate_and_cut(as_arrow(batch, ["input_ids", "special_tokens_mask"]), block_size)) == (
        mlm_expected)
    clm_batch = {key: batch[key] for key in ("input_ids", "attention_mask")}
    clm_expected = chained_group_texts(clm_batch, block_size, with_labels=True)
    assert as_lists(run_clm.group_texts(as_arrow(batch, ["input_ids"]), block_size)) == clm_expected


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 50), max_size=40),
    block_size=st.integers(1, 64),
    first_id=st.integers(0, 2**31 - 10_000),  # int32, as `datasets` stores token ids
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


@pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["clm", "mlm"])
def test_a_validation_file_that_is_the_training_file_is_tokenized_and_grouped_once(script, assets, monkeypatch,
                                                                                   tmp_path):
    grouped_texts = []
    name = GROUPING[script.__name__]
    group_texts = getattr(script, name)

    def counting_group_texts(batch, block_size):
        grouped_texts.append(batch.num_rows)
        return group_texts(batch, block_size)

    monkeypatch.setattr(script, name, counting_group_texts)
    texts = tmp_path / "texts.txt"
    lines = Path(assets.train).read_text(encoding="utf-8").splitlines(keepends=True)[:400]
    texts.write_text("".join(lines), encoding="utf-8")
    metrics = script.main(tiny_run_arguments(script, assets, tmp_path / "out", "--do_train", "--do_eval",
                                             "--max_steps", "1", "--overwrite_cache", train=texts, validation=texts,
                                             eval_samples=None))
    assert sum(grouped_texts) == len(lines)  # every line of the file once, not once per split
    assert metrics["eval_samples"] == metrics["train_samples"]  # evaluated on all of it


@pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["clm", "mlm"])
def test_the_blocks_do_not_depend_on_the_number_of_preprocessing_workers(script, assets, tmp_path):
    # Tokenized in worker processes, grouped in this one: the same blocks as all in one process.
    def blocks(*extra):
        argv = tiny_run_arguments(script, assets, tmp_path / "unused", "--do_train", "--overwrite_cache", *extra)
        model_args, data_args, training_args, *_ = script.parse_arguments(argv)
        raw_datasets = script.load_raw_datasets(model_args, data_args, training_args)
        tokenizer = script.load_tokenizer(model_args)
        return script.preprocess(raw_datasets, tokenizer, 32, data_args, training_args)["train"].to_dict()

    in_one_process = blocks()
    assert len(in_one_process["input_ids"]) > 100
    assert blocks("--preprocessing_num_workers", "2") == in_one_process
