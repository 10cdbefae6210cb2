"""The objective: what a script's kind of language modeling hands the shared phases (its model class and loss, the
lean path of its loss, its collator and the labels of prompt tuning's virtual tokens, its metrics, its samples, its
hub and PEFT task)."""

import torch
from adapters import PromptTuningConfig

from lmtune.metrics import TokenMetrics, predictions_and_losses


class Objective:
    """One script's language-modeling objective; each script subclasses it with what differs."""

    script_name = None  # the script, as messages and the model card name it
    auto_class = None  # transformers' auto class of the model, e.g. AutoModelForCausalLM
    loss_type = None  # transformers' name of the model's loss, e.g. ForCausalLM
    hub_task = None  # the hub's pipeline tag, for the model card
    peft_task_type = None  # PEFT's task type of an exported LoRA; None loads it as a plain PeftModel
    label_offset = 0  # the logits at position i predict the label at position i + label_offset
    length_flag = None  # the flag of the examples' length, e.g. --block_size
    lean_loss_kind = None  # how lmtune.lean_loss computes the loss without the full logits: CAUSAL or MASKED

    def __init__(self, lean_loss=True):
        """lean_loss: --lean_loss, whether the loss may take the lean path, where it gives the model's own numbers."""
        self.lean_loss = self.lean_loss_kind if lean_loss else None
        self.compute_metrics = TokenMetrics(self.label_offset)
        self.collator = None  # the batches' collator, once make_collator has made it

    def preprocess_logits_for_metrics(self, logits, labels):
        return predictions_and_losses(logits, labels, self.label_offset)

    def make_collator(self, tokenizer, model, data_args, training_args):
        """Make the collator of training and evaluation batches, the objective's own with prompt tuning's labels."""
        self.collator = with_prompt_labels(self.own_collator(tokenizer, data_args, training_args), model)
        return self.collator

    def own_collator(self, tokenizer, data_args, training_args):
        raise NotImplementedError

    def compute_loss_func(self, training_args):
        """The Trainer's compute_loss_func, or None for the model's own loss."""
        return None

    def trainer_callbacks(self):
        """Callbacks of the objective's own, such as a collator that learns the epoch."""
        return []

    def tokens_per_example(self, length, data_args):
        """Tokens in each training example, for the summary's tokens/s; None where examples differ in length."""
        return length

    def sample_prompt(self, tokenizer, text, max_length):
        """(record, prompt): what the samples file shows of a prompt, and the prompt as complete_sample takes it."""
        raise NotImplementedError

    def complete_sample(self, model, tokenizer, prompt):
        """The model's answer to a prompt of sample_prompt, as text."""
        raise NotImplementedError


class PromptLabelCollator:
    """Gives the virtual tokens of prompt tuning the label -100: the model's output is longer than its input by
    the prompt, and the loss and the metrics need labels of the same length."""

    def __init__(self, collator, start, length):
        self.collator, self.start, self.length = collator, start, length

    def __call__(self, examples):
        batch = self.collator(examples)
        labels = batch["labels"]
        prompt = labels.new_full((labels.shape[0], self.length), -100)
        batch["labels"] = torch.cat([labels[:, : self.start], prompt, labels[:, self.start :]], dim=1)
        return batch


def with_prompt_labels(collator, model):
    prompt_tuning = getattr(model.base_model, "prompt_tuning", None)
    active = getattr(model, "active_adapters", None)
    if prompt_tuning is None or not active or active.first() not in prompt_tuning.prompt_tunings:
        return collator  # adapters applies the prompt of the first active adapter only
    config = model.adapters_config.match(active.first(), PromptTuningConfig)
    return PromptLabelCollator(collator, 1 if config.combine == "prefix_after_bos" else 0, config.prompt_length)
