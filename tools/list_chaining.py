"""The group_texts of the Hugging Face language-modeling examples, on plain Python lists: the reference that the
scripts' Arrow-based group_texts must match (tests/test_grouping.py) and beat (benchmarks/run_benchmark.py)."""

from itertools import chain


def chained_group_texts(examples, block_size, with_labels=False):
    """Chain each column's lists into one, cut it every block_size tokens and drop what is left over; with_labels
    adds run_clm.py's labels: the input ids, but -100 for a block's first token, which nothing predicts."""
    concatenated = {key: list(chain.from_iterable(sequences)) for key, sequences in examples.items()}
    usable = len(concatenated["input_ids"]) // block_size * block_size
    result = {
        key: [tokens[i:i + block_size] for i in range(0, usable, block_size)] for key, tokens in concatenated.items()
    }
    if with_labels:
        result["labels"] = [[-100, *block[1:]] for block in result["input_ids"]]
    return result
