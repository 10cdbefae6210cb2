"""The data: reading the raw texts (hub datasets, saved datasets, local files), taking their text column, holding
out validation data, and turning texts into examples (tokenized, and grouped into blocks or one per line)."""

import glob
import logging
import math
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import DatasetDict, IterableDatasetDict, load_dataset, load_from_disk

from lmtune.errors import FIX_DATA_FILE, UsageError, cache_writes_reported, first_line, reported_as_usage_error, shorten

logger = logging.getLogger(__name__)


# File extensions accepted by --train_file/--validation_file, mapped to the `datasets` builder that reads them.
FILE_BUILDERS = {"txt": "text", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}


def file_extension(path):
    return path.rsplit(".", 1)[-1].lower()


def matching_files(path):
    """The files that a --train_file/--validation_file names: itself, or every file a glob pattern matches."""
    return sorted(glob.glob(path)) if any(character in path for character in "*?[") else [path]


def same_files(path, other):
    return {os.path.realpath(file) for file in matching_files(path)} == {
        os.path.realpath(file) for file in matching_files(other)}


def load_raw_datasets(model_args, data_args, training_args):
    """Load the train and validation splits that the run needs, carving validation out of train if missing, with
    one column, `text`."""
    hub_kwargs = {"cache_dir": model_args.cache_dir, "token": model_args.token, "streaming": data_args.streaming}
    cache = model_args.cache_dir or datasets.config.HF_DATASETS_CACHE
    if data_args.dataset_name is not None:
        if is_saved_dataset(data_args.dataset_name):
            raw_datasets = load_from_disk(data_args.dataset_name)
            if isinstance(raw_datasets, datasets.Dataset):
                raw_datasets = DatasetDict(train=raw_datasets)
            if data_args.streaming:
                raw_datasets = IterableDatasetDict({k: v.to_iterable_dataset() for k, v in raw_datasets.items()})
        else:
            with reported_as_usage_error("--dataset_name", data_args.dataset_name, cache=cache):
                raw_datasets = load_dataset(data_args.dataset_name, data_args.dataset_config_name, **hub_kwargs)
    else:
        raw_datasets = load_data_files(data_args, hub_kwargs, cache)
    if "validation" not in raw_datasets and "train" in raw_datasets:
        raw_datasets = carve_validation_split(raw_datasets["train"], data_args.validation_split_percentage)
    wanted = {"train": training_args.do_train, "validation": training_args.do_eval}
    needed = [split for split in wanted if wanted[split]]
    for split in needed:
        if split not in raw_datasets:
            raise UsageError(f"The data has no {split} split; pass --{split}_file or a dataset that has one.")
    return select_texts(type(raw_datasets)({split: raw_datasets[split] for split in needed}), data_args)


def load_data_files(data_args, hub_kwargs, cache):
    """Read --train_file and --validation_file, each as the format its own extension names, into the datasets cache
    folder cache."""
    splits = {}
    for split, flag, path in (("train", "--train_file", data_args.train_file),
                              ("validation", "--validation_file", data_args.validation_file)):
        if path is None:
            continue
        if split == "validation" and "train" in splits and same_files(path, data_args.train_file):
            splits[split] = splits["train"]  # read once, and then preprocessed once: one dataset under two names
            continue
        builder = FILE_BUILDERS[file_extension(path)]
        builder_kwargs = data_args.text_file_options() if builder == "text" else {}
        with reported_as_usage_error(flag, path, fix=FIX_DATA_FILE, cache=cache):
            splits[split] = load_dataset(builder, data_files={split: path}, split=split, **builder_kwargs,
                                         **hub_kwargs)
    return (IterableDatasetDict if data_args.streaming else DatasetDict)(splits)


def data_source(data_args, split):
    """The flag and value that the given split's data comes from."""
    if data_args.dataset_name is not None:
        return "--dataset_name", data_args.dataset_name
    if split == "validation" and data_args.validation_file is not None:
        return "--validation_file", data_args.validation_file
    return "--train_file", data_args.train_file


def select_texts(raw_datasets, data_args):
    """Give every split one column, `text`, taken from its `text` column or else its first one, without empty
    texts (None or "", and where data_args.skips_blank_texts() texts of only whitespace too). Data with no text is
    refused."""
    selected = {}  # by dataset: a file serving as both splits is read and preprocessed once
    for split, dataset in raw_datasets.items():
        if id(dataset) not in selected:
            selected[id(dataset)] = texts_of(dataset, split, data_args)
    return type(raw_datasets)({split: selected[id(dataset)] for split, dataset in raw_datasets.items()})


def texts_of(dataset, split, data_args):
    flag, name = data_source(data_args, split)
    text_column = text_column_of(dataset, split, flag, name)
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    # Whitespace is text where texts are concatenated (line breaks), but no example on its own line.
    skip_blank = data_args.skips_blank_texts()
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.filter(lambda example: bool(example["text"]) and not (skip_blank and example["text"].isspace()))
    texts = dataset.with_format("arrow")["text"]
    if not pa.types.is_string(texts.type) and not pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.string())  # a csv column of empty cells alone is read as numbers, all null
    empty = pc.fill_null(pc.equal(pc.utf8_length(texts), 0), True)
    blank = pc.or_(empty, pc.fill_null(pc.utf8_is_space(texts), True))
    if pc.all(blank).as_py():
        raise UsageError(
            f"The {split} data ({flag} {name}) has no text: all its {len(dataset):,} texts in column "
            f"'{text_column}' are empty or whitespace; check the file and its text column."
        )
    kept = np.flatnonzero(pc.invert(blank if skip_blank else empty).to_numpy(zero_copy_only=False))
    if len(kept) < len(dataset):
        logger.info(f"Skipping {len(dataset) - len(kept):,} empty texts of the {split} data.")
        dataset = dataset.select(kept)
    return dataset


def text_column_of(dataset, split, flag, name):
    """The `text` column, else the first one; it must hold text (a stream's columns are known once it is read)."""
    with reported_as_usage_error(flag, name, fix=FIX_DATA_FILE):  # the first read of a stream
        columns = dataset.column_names or list(next(iter(dataset)).keys())
    text_column = "text" if "text" in columns else columns[0]
    feature = (dataset.features or {}).get(text_column)  # streamed json/csv: unknown until read
    all_missing = not isinstance(dataset, datasets.IterableDataset) and (
        dataset.with_format("arrow")[text_column].null_count == len(dataset))  # refused for that, in texts_of
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string") and not all_missing:
        raise UsageError(
            f"The {split} data ({flag} {name}) has a text column '{text_column}' of {shorten(str(feature), 80)}, "
            "not of text; give each example its text as one string, in a column named 'text' or first."
        )
    return text_column


def is_saved_dataset(path):
    """Whether path is a folder written by save_to_disk: a DatasetDict's, or a Dataset's."""
    folder = Path(path)
    return any((folder / name).is_file() for name in (datasets.config.DATASETDICT_JSON_FILENAME,
                                                       datasets.config.DATASET_STATE_JSON_FILENAME))


def carve_validation_split(train, percentage):
    if isinstance(train, datasets.IterableDataset):
        # A stream has no length to take a percentage of, so every n-th example goes to validation instead.
        every = max(2, round(100 / percentage))
        return IterableDatasetDict(
            train=train.filter(lambda _, index: index % every != 0, with_indices=True),
            validation=train.filter(lambda _, index: index % every == 0, with_indices=True),
        )
    held_out = math.ceil(len(train) * percentage / 100)
    if held_out >= len(train):
        raise UsageError(
            f"The training data has {len(train)} texts, too few to hold out {percentage}% for validation; "
            "pass --validation_file or more data."
        )
    return DatasetDict(train=train.select(range(held_out, len(train))), validation=train.select(range(held_out)))


def tokenize_and_group(raw_datasets, tokenize, group_texts, block_size, data_args, training_args, fix):
    """Tokenize the texts with tokenize(examples) and, given group_texts(batch, block_size), concatenate them and
    cut them into blocks of block_size tokens; without group_texts every text is an example of its own. A split
    left without a single example is refused, the message ending in fix."""
    map_kwargs, tokenize_kwargs = {}, {}
    if not data_args.streaming:
        map_kwargs = {"load_from_cache_file": not data_args.overwrite_cache}
        # Only tokenizing is worth worker processes: starting a pool takes longer than grouping a corpus of
        # millions of tokens in Arrow.
        tokenize_kwargs = {"num_proc": data_args.preprocessing_num_workers}
    # The same dataset as training and validation (see load_raw_datasets) is preprocessed once.
    shared_validation = "train" in raw_datasets and raw_datasets.get("validation") is raw_datasets["train"]
    if shared_validation:
        raw_datasets = type(raw_datasets)(train=raw_datasets["train"])
    with training_args.main_process_first(desc="tokenizing and grouping"), cache_writes_reported(
            cache_folder(raw_datasets), "tokenizing and grouping the texts into the datasets cache"):
        tokenized = raw_datasets.map(
            tokenize, batched=True, remove_columns=["text"], **map_kwargs, **tokenize_kwargs,
            **progress_bar("Tokenizing", data_args),
        )
        lm_datasets = tokenized if group_texts is None else tokenized.with_format("arrow").map(
            group_texts, batched=True, fn_kwargs={"block_size": block_size}, **map_kwargs,
            **progress_bar(f"Grouping texts in blocks of {block_size}", data_args),
        ).with_format(None)
    for split, dataset in lm_datasets.items():
        if next(iter(dataset), None) is None:
            raise UsageError(no_example_message(split, tokenized[split], block_size if group_texts else None,
                                                data_args, fix))
    if shared_validation:
        lm_datasets["validation"] = lm_datasets["train"]
    return lm_datasets


def cache_folder(raw_datasets):
    """The folder where datasets writes what it computes from raw_datasets (beside their own cache files), if any."""
    files = [] if isinstance(raw_datasets, IterableDatasetDict) else [
        entry["filename"] for entries in raw_datasets.cache_files.values() for entry in entries]
    return os.path.dirname(files[0]) if files else None


def concatenate_and_cut(batch, block_size):
    """Concatenate a batch of tokenized texts (an Arrow table) and cut it into blocks of block_size tokens.

    Each batch is cut on its own, dropping at most block_size - 1 tokens: the blocks of the list-chaining
    group_texts of the Hugging Face examples, in the same order, but no token ever becomes a Python object.
    Concatenated text is attended everywhere, so the attention mask is made here instead of tokenized.
    """
    columns = {name: pc.list_flatten(batch.column(name)).to_numpy() for name in batch.column_names}
    usable = len(columns["input_ids"]) // block_size * block_size
    columns["attention_mask"] = np.ones(usable, dtype=np.int8)
    return pa.table({
        name: pa.FixedSizeListArray.from_arrays(tokens[:usable], block_size) for name, tokens in columns.items()
    })


def token_stream(texts, tokenize, limit=None):
    """The texts (a split with a `text` column, streamed or not) tokenized by tokenize(examples) as preprocessing
    does, and concatenated, all of them rather than batch by batch, into one array: its first limit tokens, reading
    no further than needed."""
    pieces, count = [], 0
    for batch in texts.iter(batch_size=1000):
        for ids in tokenize(batch)["input_ids"]:
            pieces.append(np.asarray(ids, dtype=np.int64))
            count += len(ids)
        if limit is not None and count >= limit:
            break
    return np.concatenate(pieces)[:limit]


def no_example_message(split, tokenized_split, block_size, data_args, fix):
    if block_size is None:
        return f"The {split} data has no non-empty line to make an example of; check the file and its text column."
    if data_args.streaming:
        size = "too few tokens"
    else:
        size = f"{sum(len(ids) for ids in tokenized_split['input_ids']):,} tokens in {len(tokenized_split):,} texts"
    return f"The {split} data has {size}, not enough for one block of {block_size} tokens; {fix}."


def progress_bar(description, data_args):
    # Progress bars come with `desc`; streamed datasets are processed lazily and take no such argument.
    return {} if data_args.streaming else {"desc": description}


def apply_max_samples(lm_datasets, data_args):
    """The training and validation examples, each cut to its --max_*_samples."""
    train_dataset = take_first(lm_datasets.get("train"), data_args.max_train_samples)
    eval_dataset = take_first(lm_datasets.get("validation"), data_args.max_eval_samples)
    return train_dataset, eval_dataset


def take_first(dataset, count):
    if dataset is None or count is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def read_prompts(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"--sample_prompts {path} does not exist; give a text file with one prompt per line."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--sample_prompts {path} cannot be read as UTF-8 text ({first_line(error)}).") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
