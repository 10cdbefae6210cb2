"""The evaluation's numbers: each labelled token's loss, accuracy, and perplexity, computed the same way for any
batch size and number of processes."""

import math
from typing import NamedTuple

import numpy as np
import torch


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


class SlidingWindow(NamedTuple):
    """What a sliding-window evaluation reads: a stream of token ids, windows of window tokens, moved by stride."""

    token_ids: np.ndarray
    window: int
    stride: int


def sliding_windows(length, window, stride):
    """The windows of the sliding-window evaluation of a stream of length tokens, as in the Hugging Face perplexity
    guide: (begin, end, first_scored), a window of the tokens begin to end (at most window of them) every stride
    tokens, until one reaches the stream's end. Each window scores the tokens from first_scored on, those that the
    previous window did not score, except its own first token, which no position of the window predicts.

    With stride < window every token but the stream's first is scored exactly once, with window - stride tokens of
    context or more (all before it in the first window); with stride == window they are the blocks of block
    evaluation, each one's first token unscored."""
    windows, scored_up_to = [], 0
    for begin in range(0, length - 1, stride):  # a window of the stream's last token alone would score nothing
        end = min(begin + window, length)
        windows.append((begin, end, max(scored_up_to, begin + 1)))
        scored_up_to = end
        if end == length:
            break
    return windows


def next_token_losses(model, inputs, labels):
    """The loss of each next token (0 where its label is -100) from the model's logits: the logits at position i
    predict the label at position i + 1."""
    return token_losses(model(**inputs).logits[:, :-1], labels[:, 1:])


@torch.no_grad()
def sliding_window_loss(model, token_ids, window, stride, batch_size, collator, losses_of=None):
    """The mean loss of the model over the tokens that the sliding windows of token_ids score (sliding_windows) and
    their number, computed with the model in eval mode, batch_size windows at a time. collator turns the windows'
    features (input_ids, attention_mask, labels: -100 where a token is not scored) into the model's batch, as in
    evaluation; the labels it returns may be longer than the windows (prompt tuning's virtual tokens are -100).
    losses_of(model, inputs, labels) computes the next tokens' losses instead of next_token_losses (the lean
    loss's chunks)."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    was_training = model.training
    model.eval()
    loss_sum, scored = 0.0, 0
    try:
        for batch in equal_length_batches(sliding_windows(len(token_ids), window, stride), batch_size):
            features = []
            for begin, end, first_scored in batch:
                labels = token_ids[begin:end].copy()
                labels[: first_scored - begin] = -100
                features.append({"input_ids": token_ids[begin:end], "attention_mask": np.ones(end - begin, np.int64),
                                 "labels": labels})
            inputs = {name: tensor.to(model.device) for name, tensor in collator(features).items()}
            labels = inputs.pop("labels")
            losses = (losses_of or next_token_losses)(model, inputs, labels)
            loss_sum += float(losses.sum(dtype=torch.float64))
            scored += int((labels[:, 1:] != -100).sum())
    finally:
        model.train(was_training)
    return loss_sum / scored, scored


def equal_length_batches(windows, batch_size):
    """The windows in batches of at most batch_size, each of windows of one length (the last window may be shorter):
    no padding, so no model has to be trusted to ignore it."""
    batch = []
    for item in windows:
        if batch and (len(batch) == batch_size or item[1] - item[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch
