"""The evaluation's numbers: each labelled token's loss, accuracy, and perplexity, computed the same way for any
batch size and number of processes."""

import logging
import math

import numpy as np
import torch

logger = logging.getLogger(__name__)


def token_losses(logits, labels):
    """The cross-entropy of each labelled token, 0 where the label is -100; in float32 whatever the model's dtype."""
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return losses.view_as(labels)


def perplexity(loss):
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def predictions_and_losses(logits, labels, offset):
    """What the evaluation keeps of a batch's logits (preprocess_logits_for_metrics): the predicted token ids and each
    token's loss; gathering full logits over an eval set would need vocab-size times the memory. The logits at
    position i predict the label at position i + offset."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1), token_losses(logits[:, : logits.shape[1] - offset], labels[:, offset:])


class TokenMetrics:
    """compute_metrics: accuracy and loss ("loss" replaces the Trainer's eval_loss) over every labelled token; the
    prediction at position i is for the label at position i + offset. With --batch_eval_metrics the Trainer hands
    over one batch at a time, as tensors, and asks for the result with the last one (compute_result).

    The loss is the mean over all labelled tokens. The Trainer's own is a mean of batch means, which moves with the
    eval batch size and the number of processes whenever batches differ in their number of labelled tokens (masked
    LM batches always do, a short last batch does for any model)."""

    def __init__(self, offset):
        self.offset = offset
        self.correct, self.counted, self.loss_sum = 0, 0, 0.0

    def __call__(self, eval_prediction, compute_result=True):
        (predictions, losses), labels = (
            [as_array(item) for item in eval_prediction.predictions], as_array(eval_prediction.label_ids))
        predictions = predictions[:, : predictions.shape[1] - self.offset]
        labels = labels[:, self.offset:]
        counted = labels != -100
        self.correct += int((predictions[counted] == labels[counted]).sum())
        self.counted += int(counted.sum())
        self.loss_sum += float(losses[counted].sum(dtype=np.float64))
        if not compute_result:
            return {}
        metrics = {"accuracy": self.correct / self.counted, "loss": self.loss_sum / self.counted}
        self.correct, self.counted, self.loss_sum = 0, 0, 0.0
        return metrics


def as_array(values):
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
