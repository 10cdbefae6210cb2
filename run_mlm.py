#!/usr/bin/env python
"""Fine-tune a masked language model (BERT/RoBERTa style) with an adapter, or fully, on a text dataset.

The command line follows the Hugging Face / AdapterHub `run_mlm.py` examples flag for flag, for example:

    python run_mlm.py --model_name_or_path roberta-base --dataset_name wikitext \
        --dataset_config_name wikitext-2-raw-v1 --do_train --do_eval --output_dir /tmp/test-mlm \
        --train_adapter --adapter_config seq_bn

Local files work the same way offline (`--train_file`, `--validation_file`, or a folder as `--dataset_name`).
Run `python run_mlm.py --help` for every flag. Perplexity and accuracy on the masked tokens land in
`<output_dir>/all_results.json`; the trained adapter in `<output_dir>/<adapter_name>/`.
"""

import hashlib
import logging
import math
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import datasets
import pyarrow.compute as pc
import torch
from transformers import AutoModelForMaskedLM, PreTrainedTokenizerBase, TrainerCallback, default_data_collator, set_seed
from transformers.data.data_collator import pad_without_fast_tokenizer_warning

from lmtune.adapter_setup import check_adapter_options, setup_adapter
from lmtune.arguments import AdapterGroupArguments, DataArguments, parse_command_line
from lmtune.checks import check_arguments
from lmtune.data import apply_max_samples, concatenate_and_cut, load_raw_datasets, progress_bar, tokenize_and_group
from lmtune.errors import UsageError, run_from_command_line
from lmtune.hub import publish
from lmtune.lean_loss import MASKED
from lmtune.logs import setup_logging
from lmtune.merge import write_merged_model
from lmtune.metrics import token_losses
from lmtune.modeling import example_length, load_config, load_model, load_tokenizer, tokenizer_source
from lmtune.objective import Objective, with_prompt_labels
from lmtune.output_dir import (
    check_nothing_in_the_way,
    check_resume_checkpoint,
    claimed_output_dir,
    detect_last_checkpoint,
)
from lmtune.peft_export import write_peft_adapter
from lmtune.reporting import Written, plot_training_curves, print_summary
from lmtune.samples import write_samples
from lmtune.training import add_early_stopping, build_trainer, evaluate, train
from lmtune.trial_step import check_adapter_trains

logger = logging.getLogger(__name__)

# Samples: the share of a prompt's tokens that are masked to fill, where the prompt has no mask token of its own.
SAMPLE_MASKED_SHARE = 0.15


@dataclass
class MaskedDataArguments(DataArguments):
    """Which data to train and evaluate on, how to cut it into examples, and how much of them to mask."""

    max_seq_length: Optional[int] = field(
        default=None,
        metadata={
            "help": "Length in tokens of each example: texts are concatenated and cut to it, or with "
            "--line_by_line truncated to it. Default: the smallest of 1024 and the model's and tokenizer's "
            "length limits; larger values are clamped to them."
        },
    )
    mlm_probability: float = field(
        default=0.15, metadata={"help": "Fraction of tokens to mask for the masked language modeling loss."}
    )
    line_by_line: bool = field(
        default=False,
        metadata={"help": "Treat each non-empty line (row) as its own example instead of concatenating texts."},
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "With --line_by_line, pad every example to --max_seq_length; otherwise each batch is padded "
            "to its longest example (faster)."
        },
    )

    def check_own_flags(self, training_args):
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise UsageError(
                f"--max_seq_length {self.max_seq_length} leaves no context to predict a masked token from: give "
                "at least 2 tokens, or leave it out for the model's length."
            )
        if not 0 < self.mlm_probability < 1:
            raise UsageError(
                f"--mlm_probability {self.mlm_probability} must be between 0 and 1 (exclusive), e.g. 0.15."
            )

    def skips_blank_texts(self):
        return self.line_by_line


@dataclass
class MaskedAdapterArguments(AdapterGroupArguments):
    adapter_name: str = field(default="mlm", metadata={"help": AdapterGroupArguments.ADAPTER_NAME_HELP})


def parse_arguments(argv):
    return parse_command_line(argv, MaskedDataArguments, MaskedAdapterArguments)


def load_tokenizer_with_mask(model_args):
    tokenizer = load_tokenizer(model_args)
    if tokenizer.mask_token is None:
        flag, name = tokenizer_source(model_args)
        raise UsageError(
            f"{flag} {name} has no mask token, so it cannot train a masked language model; use the tokenizer of "
            "one such as roberta-base or bert-base-uncased (or run_clm.py for causal language modeling)."
        )
    return tokenizer


def choose_max_seq_length(data_args, tokenizer, config):
    # A line's own special tokens (<s> and </s>) take part of its length and are never masked.
    shortest = tokenizer.num_special_tokens_to_add() + 1 if data_args.line_by_line else 2
    if data_args.max_seq_length is not None and data_args.max_seq_length < shortest:
        raise UsageError(
            f"--max_seq_length {data_args.max_seq_length} leaves no token to mask in a line after its "
            f"{shortest - 1} special tokens; give at least {shortest}."
        )
    return example_length("--max_seq_length", data_args.max_seq_length, tokenizer, config)


def preprocess(raw_datasets, tokenizer, max_seq_length, data_args, training_args):
    """Tokenize the texts into examples of max_seq_length tokens: one per line, or concatenated and cut."""
    if data_args.line_by_line:
        padding = "max_length" if data_args.pad_to_max_length else False
        tokenizer_kwargs = {"padding": padding, "truncation": True, "max_length": max_seq_length}
    else:
        tokenizer_kwargs = {"return_attention_mask": False}  # concatenate_and_cut makes them

    def tokenize(examples):
        # verbose=False: texts longer than the model's limit are expected, grouping cuts them into blocks afterwards.
        # The special-tokens mask keeps <s>, </s> and padding out of the masking.
        return tokenizer(examples["text"], return_special_tokens_mask=True, verbose=False, **tokenizer_kwargs)

    return tokenize_and_group(raw_datasets, tokenize, None if data_args.line_by_line else concatenate_and_cut,
                              max_seq_length, data_args, training_args,
                              fix="pass a smaller --max_seq_length, --line_by_line, or more data")


def loss_per_masked_token(outputs, labels, num_items_in_batch=None):
    """The training loss per masked token of the whole step, over every process and accumulated batch, as one process
    with all of it would compute it: the model's own loss is a mean per batch, and batches differ in their number of
    masked tokens. The Trainer counts the step's masked tokens (over all processes, unless
    --average_tokens_across_devices false) and scales the loss by the number of processes, whose gradients are
    averaged."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    count = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return token_losses(logits, labels).sum() / count


def mask_tokens(ids, special, probability, tokenizer, generator):
    """BERT's masking of a row of token ids, drawn from generator as transformers' DataCollatorForLanguageModeling
    draws it: each token but the special ones is chosen with probability; of those, 80% become the mask token, 10% a
    random token and 10% stay. The masked ids, and the labels: the chosen tokens' ids, -100 elsewhere."""
    chosen = torch.bernoulli(torch.full(ids.shape, probability).masked_fill_(special, 0.0), generator=generator).bool()
    labels = ids.masked_fill(~chosen, -100)
    masked = ids.clone()
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).bool() & chosen
    masked[replaced] = tokenizer.mask_token_id
    randomized = torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).bool() & chosen & ~replaced
    random_words = torch.randint(len(tokenizer), ids.shape, dtype=torch.long, generator=generator)
    masked[randomized] = random_words[randomized]
    return masked, labels


@dataclass
class MaskingCollator(TrainerCallback):
    """Masks training examples afresh in every epoch; validation examples, masked once beforehand, are only padded.

    An example's masks come from its own generator, seeded by the run's seed, the epoch and the example's tokens:
    never from the global random state, which a resumed run restores only after its first batch, nor from the rest
    of the batch, which changes with the batch size and the number of processes."""

    tokenizer: PreTrainedTokenizerBase
    mlm_probability: float = 0.15
    pad_to_multiple_of: Optional[int] = None
    seed: int = 42

    def __post_init__(self):
        # In shared memory: data loader workers, persistent ones too, read the epoch the Trainer sets in this process.
        self.shared_epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    @property
    def epoch(self):
        return int(self.shared_epoch[0])

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch counts fractions of an epoch, restored on resume.
        self.shared_epoch[0] = math.floor(state.epoch or 0)

    def __call__(self, examples):
        if "labels" not in examples[0]:
            examples = [self.mask_example(example) for example in examples]
        labels = [example["labels"] for example in examples]
        inputs = [{key: value for key, value in example.items() if key != "labels"} for example in examples]
        # Without the tip that a fast tokenizer pads faster when it tokenizes: these examples are tokenized already.
        batch = pad_without_fast_tokenizer_warning(
            self.tokenizer, inputs, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of
        )
        length = batch["input_ids"].shape[1]
        padded = [
            [-100] * (length - len(row)) + list(row) if self.tokenizer.padding_side == "left"
            else list(row) + [-100] * (length - len(row))
            for row in labels
        ]
        batch["labels"] = torch.tensor(padded, dtype=torch.long)
        return batch

    def mask_example(self, example):
        start, end = own_tokens(example)
        tokens = torch.tensor(example["input_ids"][start:end], dtype=torch.long)
        salt = f"{self.seed}/{self.epoch}".encode()
        digest = hashlib.blake2b(tokens.numpy().tobytes(), digest_size=8, key=salt).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
        # The tokenizer tells the special tokens, which are never masked: the Trainer has dropped the
        # special_tokens_mask column, an input the model does not take.
        special = self.tokenizer.get_special_tokens_mask(tokens.tolist(), already_has_special_tokens=True)
        input_ids, labels = mask_own_tokens(example, start, end, special,
                                            partial(mask_tokens, probability=self.mlm_probability,
                                                    tokenizer=self.tokenizer, generator=generator))
        inputs = {key: value for key, value in example.items() if key != "special_tokens_mask"}
        return {**inputs, "input_ids": input_ids, "labels": labels}


def own_tokens(example):
    """Where an example's own tokens are, padding (--pad_to_max_length) left out: masks are drawn for them alone,
    so that padding changes none of them."""
    attended = example.get("attention_mask")
    if not attended:
        return 0, len(example["input_ids"])
    start = attended.index(1)
    return start, start + sum(attended)


def mask_own_tokens(example, start, end, special, mask):
    """The masks of the tokens start to end of an example, drawn by mask(ids, special) given their special-tokens
    mask: its input ids, and its labels, -100 elsewhere."""
    ids = list(example["input_ids"])
    masked, labels = mask(torch.tensor(ids[start:end]), torch.tensor(special, dtype=torch.bool))
    return ids[:start] + masked.tolist() + ids[end:], [-100] * start + labels.tolist() + [-100] * (len(ids) - end)


def mask_eval_dataset(eval_dataset, tokenizer, data_args, seed):
    """Mask the validation examples once, identically for every run with this seed, so eval losses compare."""
    if eval_dataset is None:
        return None

    def mask(example, index):
        # A generator per example, seeded by its position: the masks depend on neither batching nor workers.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        start, end = own_tokens(example)
        input_ids, labels = mask_own_tokens(
            example, start, end, example["special_tokens_mask"][start:end],
            partial(mask_tokens, probability=data_args.mlm_probability, tokenizer=tokenizer, generator=generator))
        return {"input_ids": input_ids, "labels": labels}

    masked = eval_dataset.map(
        mask, with_indices=True, remove_columns=["special_tokens_mask"],
        **progress_bar("Masking validation data", data_args),
    )
    if not isinstance(masked, datasets.IterableDataset) and not pc.any(
            pc.not_equal(pc.list_flatten(masked.with_format("arrow")["labels"]), -100)).as_py():
        raise UsageError(
            f"The validation data has no token to evaluate: none of its {len(masked):,} examples got a masked token "
            "(they hold only special tokens, or are very short); give more text or a larger --mlm_probability."
        )
    return masked


class MaskedLanguageModeling(Objective):
    """Predict masked tokens from the text around them; samples fill a prompt's masks with the top predictions."""

    script_name = Path(__file__).name
    auto_class = AutoModelForMaskedLM
    loss_type = "ForMaskedLM"
    hub_task = "fill-mask"
    peft_task_type = None  # PEFT has no masked-LM task type: it loads the adapter as a plain PeftModel
    lean_loss_kind = MASKED
    label_offset = 0  # only the masked positions carry a label; every other position is -100
    length_flag = "--max_seq_length"

    def own_collator(self, tokenizer, data_args, training_args):
        # Batches padded to a multiple of 8 let fp16/bf16 matrix kernels run at full speed.
        pad_to_multiple_of_8 = (data_args.line_by_line and not data_args.pad_to_max_length
                                and (training_args.fp16 or training_args.bf16))
        self.masking_collator = MaskingCollator(tokenizer=tokenizer, mlm_probability=data_args.mlm_probability,
                                                pad_to_multiple_of=8 if pad_to_multiple_of_8 else None,
                                                seed=training_args.seed)
        return self.masking_collator

    def compute_loss_func(self, training_args):
        # The Trainer would skip --label_smoothing_factor for a compute_loss_func: a smoothed run keeps its loss.
        return None if training_args.label_smoothing_factor else loss_per_masked_token

    def trainer_callbacks(self):
        # The masking collator learns the epoch from the Trainer, so that every epoch masks the text differently.
        return [self.masking_collator]

    def tokens_per_example(self, length, data_args):
        # Line-by-line examples are padded per batch, so only fixed-length examples give an exact token count.
        return length if not data_args.line_by_line or data_args.pad_to_max_length else None

    def sample_prompt(self, tokenizer, text, max_length):
        """The prompt's own mask tokens to fill, or else evenly spaced tokens of it, masked; the record shows the
        masked prompt and, where the script masked it, the original text."""
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        masked = [index for index, token in enumerate(ids) if token == tokenizer.mask_token_id]
        original = None
        if not masked:
            words = [index for index, token in enumerate(ids) if token not in tokenizer.all_special_ids]
            count = max(1, round(len(words) * SAMPLE_MASKED_SHARE))
            step = max(1, len(words) // count)
            masked = words[step // 2::step][:count]
            original = tokenizer.decode(ids, skip_special_tokens=True)
            ids = [tokenizer.mask_token_id if index in masked else token for index, token in enumerate(ids)]
        shown = [token for token in ids if token == tokenizer.mask_token_id or token not in tokenizer.all_special_ids]
        record = {"prompt": tokenizer.decode(shown)}
        if original is not None:
            record["expected"] = original
        return record, (ids, masked)

    def complete_sample(self, model, tokenizer, prompt):
        """The prompt with each mask replaced by the model's top prediction."""
        ids, masked = prompt
        labels = [token if index in masked else -100 for index, token in enumerate(ids)]
        # Prompt tuning puts virtual tokens before the text; its collator moves the labels to where the logits are.
        collate = with_prompt_labels(default_data_collator, model)
        batch = collate([{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}])
        at_masks = batch.pop("labels")[0] != -100
        logits = model(**{name: tensor.to(model.device) for name, tensor in batch.items()}).logits
        filled = list(ids)
        for index, token in zip(masked, logits[0, at_masks].argmax(dim=-1).tolist()):
            filled[index] = token
        return tokenizer.decode(filled, skip_special_tokens=True)


def main(argv=None):
    model_args, data_args, training_args, adapter_args, evaluation_args = parse_arguments(argv)
    setup_logging(training_args, logger)
    objective = MaskedLanguageModeling(model_args.lean_loss)
    check_arguments(model_args, data_args, training_args, adapter_args, evaluation_args)
    with claimed_output_dir(training_args):
        last_checkpoint = detect_last_checkpoint(training_args)
        check_resume_checkpoint(last_checkpoint, training_args, adapter_args)
        check_nothing_in_the_way(training_args, adapter_args, evaluation_args)
        set_seed(training_args.seed)

        config = load_config(model_args)
        tokenizer = load_tokenizer_with_mask(model_args)
        raw_datasets = load_raw_datasets(model_args, data_args, training_args)
        model = load_model(model_args, config, tokenizer, objective.auto_class, objective.loss_type)
        setup_adapter(model, adapter_args)
        check_adapter_options(model, model_args, adapter_args)
        data_collator = objective.make_collator(tokenizer, model, data_args, training_args)
        check_adapter_trains(model, tokenizer, data_collator, model_args, training_args, adapter_args)

        max_seq_length = choose_max_seq_length(data_args, tokenizer, config)
        lm_datasets = preprocess(raw_datasets, tokenizer, max_seq_length, data_args, training_args)
        train_dataset, eval_dataset = apply_max_samples(lm_datasets, data_args)
        eval_dataset = mask_eval_dataset(eval_dataset, tokenizer, data_args, training_args.seed)
        trainer = build_trainer(objective, model, tokenizer, train_dataset, eval_dataset, training_args, adapter_args)
        add_early_stopping(trainer, evaluation_args)

        metrics = {}
        if training_args.do_train:
            metrics.update(train(trainer, train_dataset, last_checkpoint, training_args))
        if training_args.do_eval:
            metrics.update(evaluate(trainer, eval_dataset))
        samples = write_samples(objective, trainer, tokenizer, raw_datasets, max_seq_length, evaluation_args,
                                adapter_args)
        merged = write_merged_model(trainer.model, tokenizer, model_args, training_args, adapter_args)
        peft = write_peft_adapter(objective, trainer.model, model_args, training_args, adapter_args)
        publish(objective, trainer, model_args, data_args)
        curves = plot_training_curves(trainer, training_args)
        print_summary(trainer, metrics, objective.tokens_per_example(max_seq_length, data_args),
                      Written(samples, merged, peft, curves), adapter_args)
    return metrics


def _mp_fn(index):
    # Entry point for TPU spawners such as xla_spawn.py: the same one-line errors as the command line.
    status = cli()
    if status:
        sys.exit(status)


def cli(argv=None):
    return run_from_command_line(main, argv, Path(__file__).name)


if __name__ == "__main__":
    sys.exit(cli())
