"""Lean losses: the training and evaluation loss without the batch x length x vocabulary logits that nobody reads.

A causal LM's output projection and cross-entropy run over chunks of the predicted positions, each chunk's logits
freed before the next: the gradient of the chunk's loss with respect to the hidden states (and to the projection,
where it is trained) is computed in the forward pass, as fused linear cross-entropy implementations do, so the head
costs the same matrix products as the model's own. A masked LM's head runs at the masked positions alone. Evaluation
keeps per position what lmtune.metrics keeps of the logits (each token's loss, the argmax), chunk by chunk.

The hidden states are those the model's own forward hands its output projection (a causal LM) or its head (a masked
LM), taken and replaced there by hooks while the model runs as usual: whatever the model, its adapters or a wrapper
(DDP) do before the head stays as it is. What the model does after its projection (logit soft-capping, scaling) is
not done here, so each run compares the two paths on its first batch, in its precision, and keeps the model's own
where they differ, saying so in one line."""

import logging
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from lmtune.errors import UsageError, first_line

logger = logging.getLogger(__name__)

CAUSAL, MASKED = "causal", "masked"
# Logits computed at once: 64 MiB in float32, whatever the vocabulary (341 positions of 49,152, 65 of 256,000).
CHUNK_LOGITS = 2**24
# The largest relative difference from the model's own loss and gradients (per weight tensor) that counts as the
# same numbers: float32's summation-order noise; under autocast, one rounding of the dtype (loss), and for the
# gradients the 2**4 times more that a sum over the positions of terms rounded differently reaches (measured on
# tiny models: up to 2**-4.5 on a bottleneck adapter's bias under bfloat16).
TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (2**-8, 2**-4), torch.float16: (2**-11, 2**-7)}
# A weight tensor's gradient below this share of the norm of all of them is compared against that share instead:
# some are zero but for rounding (the bias of attention keys, which the softmax cancels).
GRADIENT_FLOOR = 1e-3
# The largest logit of the probe that shows whether a model changes its logits after its output projection: soft-caps
# and scales leave logits this large far from the projection's.
PROBE_LOGIT = 1000.0


class LeanUnfit(Exception):
    """The model does not hand its head what the lean path expects (another call pattern or another shape)."""


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)) / divisor, chunk by chunk, with the gradients computed
    in the forward pass and scaled by grad_output in the backward: no chunk's logits outlive it. The matrix products
    run in the dtype that autocast gives the projection, on the gradient of the logits rounded to it, as in the model's
    own backward; in float16 that gradient is the sum's, divided by divisor only in the backward (where the loss
    scale has come in), since the mean's would underflow. The gradients are kept in float32 until then."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, divisor):
        rows = max(1, CHUNK_LOGITS // weight.shape[0])
        wants_weight, wants_bias = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if wants_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        divisor = torch.as_tensor(divisor, dtype=torch.float32, device=hidden.device)
        compute_weight, late_divisor = None, torch.ones_like(divisor)
        for start in range(0, hidden.shape[0], rows):
            chunk, chunk_targets = hidden[start:start + rows], targets[start:start + rows]
            logits = F.linear(chunk, weight, bias)
            if compute_weight is None:
                compute_weight = weight.to(logits.dtype)
                late_divisor = divisor if logits.dtype == torch.float16 else late_divisor
            gradient, loss = softmax_minus_target(logits, chunk_targets)
            total += loss
            gradient = gradient.div_(divisor / late_divisor).to(logits.dtype)
            grad_hidden[start:start + rows] = gradient @ compute_weight
            if wants_weight:
                grad_weight += gradient.t() @ chunk.to(logits.dtype)
            if wants_bias:
                grad_bias += gradient.sum(0, dtype=torch.float32)
            del logits, gradient
        ctx.gradients = grad_hidden, grad_weight, grad_bias
        ctx.divisor, ctx.dtypes = late_divisor, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        scale = grad_output / ctx.divisor
        grads = [None if grad is None else (grad * scale).to(dtype) for grad, dtype in zip(ctx.gradients, ctx.dtypes)]
        ctx.gradients = None
        return *grads, None, None


def softmax_minus_target(logits, targets):
    """The gradient of the summed cross-entropy with respect to the logits (softmax - one-hot), in float32 as the
    model's loss computes it, and the summed loss; in place of the float32 logits, which are not needed after."""
    logits = logits.float()
    log_normalizer = torch.logsumexp(logits, dim=-1)
    loss = (log_normalizer - logits.gather(1, targets.unsqueeze(1)).squeeze(1)).sum()
    gradient = logits.sub_(log_normalizer.unsqueeze(1)).exp_()
    gradient[torch.arange(len(targets), device=targets.device), targets] -= 1
    return gradient, loss


@torch.no_grad()
def chunked_losses_and_predictions(hidden, weight, bias, targets):
    """Each row's cross-entropy (float32) and argmax under the projection, chunk by chunk."""
    rows = max(1, CHUNK_LOGITS // weight.shape[0])
    losses, predictions = [], []
    for start in range(0, hidden.shape[0], rows):
        logits = F.linear(hidden[start:start + rows], weight, bias)
        predictions.append(logits.argmax(dim=-1))
        losses.append(F.cross_entropy(logits.float(), targets[start:start + rows], reduction="none"))
    return torch.cat(losses), torch.cat(predictions)


@contextmanager
def head_input_taken(model):
    """The hidden states that the model's forward hands its output projection, taken there; the projection (and all
    the model does after it) computes on none of the positions instead."""
    taken = []

    def take(module, args):
        taken.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(take)
    try:
        yield taken
    finally:
        handle.remove()


@contextmanager
def head_at(model, positions):
    """The model's head applied only at positions (a boolean batch x length mask): the backbone's hidden states
    there, as one sequence, replace its output before the head reads it."""
    def select(module, args, output):
        hidden = output[0]
        if hidden.shape[:2] != positions.shape:
            raise LeanUnfit(f"hidden states of shape {tuple(hidden.shape)} for labels of {tuple(positions.shape)}")
        selected = hidden[positions].unsqueeze(0)
        if isinstance(output, tuple):
            return (selected, *output[1:])
        output[next(iter(output.keys()))] = selected
        return output

    handle = model.base_model.register_forward_hook(select)
    try:
        yield
    finally:
        handle.remove()


def output_projection(model):
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.dim() != 2:
        raise LeanUnfit(f"an output layer of type {type(head).__name__}, not a linear projection")
    return head.weight, head.bias


@contextmanager
def logits_probed(model):
    """The logits that leave the model's output projection replaced by a probe, a ramp from -PROBE_LOGIT to
    PROBE_LOGIT over the vocabulary at one position; changed(outputs) says whether the model's forward changed them
    after the projection (soft-capping, scaling, slicing, ...), which the lean path would not do."""
    probes = []

    def replace(module, args, output):
        ramp = torch.linspace(-PROBE_LOGIT, PROBE_LOGIT, output.shape[-1], device=output.device).to(output.dtype)
        probes.append(ramp.expand(*output.shape[:-2], 1, output.shape[-1]))
        return probes[-1]

    def changed(outputs):
        if len(probes) != 1:
            raise LeanUnfit(f"the output layer was called {len(probes)} times, not once")
        logits = (outputs["logits"] if isinstance(outputs, dict) else outputs[0]).float()
        if logits.shape != probes[0].shape:
            return True
        return not (logits - probes[0].float()).abs().amax() <= 8 * torch.finfo(probes[0].dtype).eps * PROBE_LOGIT

    handle = model.get_output_embeddings().register_forward_hook(replace)
    try:
        yield changed
    finally:
        handle.remove()


def causal_rows(model, call, inputs):
    """The hidden states of the predicted positions (labelled at the next position) and their targets."""
    labels = inputs["labels"]
    with head_input_taken(model) as taken:
        call(**{name: value for name, value in inputs.items() if name != "labels"})
    if len(taken) != 1 or taken[0].shape[:2] != labels.shape:
        raise LeanUnfit(f"the output layer was called {len(taken)} times, not once on batch x length hidden states")
    predicted = labels[:, 1:] != -100
    return taken[0][:, :-1][predicted], labels[:, 1:][predicted], predicted


def masked_logits(model, call, inputs):
    """The logits of the masked positions alone, as the model's own head computes them, and their targets."""
    labels = inputs["labels"]
    masked = labels != -100
    with head_at(model, masked):
        outputs = call(**{name: value for name, value in inputs.items() if name != "labels"})
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    return logits[0], labels[masked], masked


def lean_loss(objective, model, call, inputs, divisor):
    """The loss of the batch, summed over the labelled tokens and divided by divisor, as the model's own computes
    it. model is the model itself, call what runs it (the model, or a wrapper of it such as DDP)."""
    if objective == CAUSAL:
        hidden, targets, _ = causal_rows(model, call, inputs)
        weight, bias = output_projection(model)
        return LinearCrossEntropy.apply(hidden, weight, bias, targets, divisor)
    logits, targets, _ = masked_logits(model, call, inputs)
    return F.cross_entropy(logits.float(), targets, reduction="sum") / divisor


def lean_evaluation(objective, model, call, inputs):
    """Per position of the batch, what lmtune.metrics.predictions_and_losses keeps of the logits: the argmax
    (-100 where no label is predicted) and the token's loss (0 there), without the logits."""
    labels = inputs["labels"]
    if objective == CAUSAL:
        hidden, targets, where = causal_rows(model, call, inputs)
        losses, predictions = chunked_losses_and_predictions(hidden, *output_projection(model), targets)
        placed = (slice(None), slice(None, -1))  # position i predicts the label at i + 1
    else:
        logits, targets, where = masked_logits(model, call, inputs)
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        predictions = logits.argmax(dim=-1)
        placed = (slice(None), slice(None))
    all_predictions = torch.full_like(labels, -100)
    all_losses = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    all_predictions[placed][where] = predictions
    all_losses[placed][where] = losses
    return all_predictions, all_losses


def labelled_row(inputs, objective):
    """The batch's first example that has a token to predict, as a batch of one; None if none has."""
    labels = inputs["labels"]
    counted = (labels[:, 1:] if objective == CAUSAL else labels) != -100
    rows = counted.any(dim=1).nonzero()
    if not len(rows):
        return None
    index, size = int(rows[0]), labels.shape[0]
    return {name: value[index:index + 1] if torch.is_tensor(value) and value.dim() and value.shape[0] == size
            else value for name, value in inputs.items()}


def labelled_count(inputs, objective):
    labels = inputs["labels"]
    return ((labels[:, 1:] if objective == CAUSAL else labels) != -100).sum()


@contextmanager
def random_numbers_repeatable(device):
    """Within the block, again() sets the random state (CPU and device) back to what it was at the block's start,
    as it is after the block: dropout draws the same in both paths, and training draws as if nothing had run."""
    accelerator = getattr(torch, device.type, None) if device.type != "cpu" else None
    if accelerator is not None and not hasattr(accelerator, "get_rng_state"):
        accelerator = None
    states = torch.get_rng_state(), accelerator.get_rng_state() if accelerator else None

    def again():
        torch.set_rng_state(states[0])
        if accelerator:
            accelerator.set_rng_state(states[1])

    try:
        yield again
    finally:
        again()


def loss_and_gradients(compute, trained, scale):
    """compute()'s loss and, by a backward pass, the gradients of the trained weights, whose .grad stay as they
    were. A backward pass rather than torch.autograd.grad: transformers' gradient checkpointing is reentrant by
    default, which autograd.grad cannot go through."""
    loss = compute()
    if not trained:
        return loss.detach().float(), []
    kept = [parameter.grad for _, parameter in trained]
    for _, parameter in trained:
        parameter.grad = None
    try:
        (loss * scale).backward()
        grads = [torch.zeros_like(parameter, dtype=torch.float32) if parameter.grad is None
                 else parameter.grad.float() / scale for _, parameter in trained]
    finally:
        for (_, parameter), grad in zip(trained, kept):
            parameter.grad = grad
    return loss.detach().float(), grads


def first_difference(own, lean, names, tolerances):
    """Where the lean path's loss and gradients differ from the model's own by more than the dtype's tolerances,
    in words; None where they agree. Also the loss's relative difference, for the log."""
    (own_loss, own_grads), (lean_loss_value, lean_grads) = own, lean
    loss_tolerance, gradient_tolerance = tolerances
    if not torch.isfinite(own_loss):
        return f"the model's own loss of the first batch is {float(own_loss)}", None
    relative = float((lean_loss_value - own_loss).abs() / own_loss.abs().clamp_min(torch.finfo(torch.float32).tiny))
    if not relative <= loss_tolerance:
        return f"its loss of the first batch is {float(lean_loss_value):.8g}, the model's {float(own_loss):.8g}", None
    total = torch.sqrt(sum((grad.double() ** 2).sum() for grad in own_grads)) if own_grads else 0
    for name, own_grad, lean_grad in zip(names, own_grads, lean_grads):
        gap = float((lean_grad.double() - own_grad.double()).norm())
        if not gap <= gradient_tolerance * max(float(own_grad.double().norm()), GRADIENT_FLOOR * float(total)):
            return f"its gradient of {name} differs from the model's by {gap:.3g} (norm)", None
    return None, relative


def compute_dtype(model):
    device_type = model.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return model.dtype


def fixed_reason(trainer):
    """Why the run keeps the model's own forward whatever its first batch gives; None if nothing does."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    args = trainer.args
    if args.device.type == "xla":
        return "on XLA the positions it computes change from batch to batch, and so would the compiled graph"
    if trainer.is_fsdp_enabled:
        return "FSDP gathers the output layer's sharded weights only while the layer runs, and the lean path reads them"
    if trainer.is_deepspeed_enabled:
        stage = "ZeRO-3 shards the output layer's weights" if is_deepspeed_zero3_enabled() else (
            "its gradient hooks would see the comparison with the model's own loss")
        return f"under DeepSpeed {stage}"
    if args.torch_compile:
        return "--torch_compile compiles the model's own forward"
    if args.use_liger_kernel:
        return "--use_liger_kernel computes the loss with Liger's fused kernels"
    if trainer.label_smoother is not None:
        return "--label_smoothing_factor smooths the model's own loss"
    return None


def refuse_liger_with_invertible_adapters(trainer):
    """Liger's fused loss reads the output layer's weight and never calls the layer: the inverse of an invertible
    adapter, which adapters applies as the layer's input hook, would be skipped and the numbers would change."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.args.use_liger_kernel and len(getattr(model.base_model, "invertible_adapters", None) or ()):
        raise UsageError(
            "--use_liger_kernel computes the loss from the output layer's weights without running the layer, which "
            "would skip the inverse of the invertible adapter (e.g. seq_bn_inv) that adapters applies there; drop "
            "--use_liger_kernel, or use an adapter configuration without an invertible adapter."
        )


class LeanLossMixin:
    """A Trainer whose loss, in training and in evaluation, takes the lean path (lean_loss= CAUSAL or MASKED; None:
    never) wherever the run's first batch shows that it gives the model's own loss and gradients. The Trainer's own
    compute_loss stays what the lean path is compared with and what runs otherwise."""

    def __init__(self, *args, lean_loss=None, **kwargs):
        super().__init__(*args, **kwargs)
        refuse_liger_with_invertible_adapters(self)
        self.lean_objective = lean_loss
        self.lean_decisions = {}  # model.training -> whether the lean path computes the loss in that mode
        if lean_loss and self.preprocess_logits_for_metrics is not None:
            self.own_preprocess_logits = self.preprocess_logits_for_metrics
            self.preprocess_logits_for_metrics = self.lean_preprocess_logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.uses_lean_loss(model, inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        divisor = self.loss_divisor(inputs, num_items_in_batch)
        outputs = None
        if unwrapped.training:
            loss = lean_loss(self.lean_objective, unwrapped, model, inputs, divisor)
        else:
            predictions, losses = lean_evaluation(self.lean_objective, unwrapped, model, inputs)
            loss = losses.sum() / divisor
            outputs = {"loss": loss, "logits": (predictions, losses)}
        if (self.args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func)
                and num_items_in_batch is not None):  # as the Trainer's compute_loss scales its loss
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs or {"loss": loss}) if return_outputs else loss

    def loss_divisor(self, inputs, num_items_in_batch):
        """What the model's own loss divides the summed token losses by: the Trainer's count over the whole step
        where it hands it to the model (or to compute_loss_func), else the batch's own count."""
        if num_items_in_batch is not None and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            return num_items_in_batch
        return labelled_count(inputs, self.lean_objective)

    def lean_preprocess_logits(self, logits, labels):
        """preprocess_logits_for_metrics: what the lean evaluation computed already, else the script's own."""
        if not self.lean_decisions.get(False):
            return self.own_preprocess_logits(logits, labels)
        predictions, losses = logits
        offset = 1 if self.lean_objective == CAUSAL else 0
        return predictions, losses[:, :losses.shape[1] - offset]

    def lean_next_token_losses(self):
        """For lmtune.metrics.sliding_window_loss: each next token's loss computed by chunks, where the evaluation
        took the lean path; None where the model's own logits are needed."""
        if self.lean_objective != CAUSAL or not self.lean_decisions.get(False):
            return None

        def next_token_losses(model, inputs, labels):
            return lean_evaluation(CAUSAL, model, model, {**inputs, "labels": labels})[1][:, :-1]

        return next_token_losses

    def uses_lean_loss(self, model, inputs):
        if not self.lean_objective or "labels" not in inputs:
            return False
        mode = model.training
        if mode not in self.lean_decisions:
            reason = fixed_reason(self)
            if reason is not None:
                self.lean_decisions = {True: False, False: False}
                if self.is_world_process_zero():
                    logger.warning(f"The lean loss is off: {reason}; the model's own forward computes the loss, "
                                   "with all its logits at once.")
                return False
            decision = self.decide_lean_loss(model, inputs)
            if decision is None:
                return False  # no example of this batch has a label: the next batch decides
            self.lean_decisions[mode] = decision
        return self.lean_decisions[mode]

    def decide_lean_loss(self, model, inputs):
        """Whether the lean path gives the model's own loss and gradients (of the trained weights) on the first
        example of the batch that has a label, in the run's precision; one line says what was decided."""
        row = labelled_row(inputs, self.lean_objective)
        if row is None:
            return None
        unwrapped = self.accelerator.unwrap_model(model)
        training = unwrapped.training
        trained = [(name, parameter) for name, parameter in unwrapped.named_parameters()
                   if parameter.requires_grad] if training else []
        dtype = compute_dtype(unwrapped)
        scale = 2.0**16 if dtype == torch.float16 else 1.0  # as a GradScaler starts: no float16 gradient underflows
        count = labelled_count(row, self.lean_objective)

        def own():
            return super(LeanLossMixin, self).compute_loss(unwrapped, dict(row))

        mode = "training" if training else "evaluation"
        outputs = []

        def lean_call(**inputs):
            outputs.append(unwrapped(**inputs))
            return outputs[-1]

        def lean():
            if training:
                return lean_loss(self.lean_objective, unwrapped, lean_call, row, count)
            return lean_evaluation(self.lean_objective, unwrapped, lean_call, row)[1].sum() / count

        probed = logits_probed(unwrapped) if self.lean_objective == CAUSAL else nullcontext()
        with random_numbers_repeatable(unwrapped.device) as again:
            try:
                own_result = loss_and_gradients(own, trained, scale)
                again()
                with probed as changed:
                    lean_result = loss_and_gradients(lean, trained, scale)
                if changed is not None and changed(outputs[-1]):
                    return self.lean_loss_off(mode, "the model changes its logits after its output layer (e.g. logit "
                                                    "soft-capping or scaling)")
            except (LeanUnfit, RuntimeError, ValueError, TypeError, IndexError, KeyError) as error:
                return self.lean_loss_off(mode, f"this model's forward does not fit it ({first_line(error)})")
        difference, relative = first_difference(own_result, lean_result, [name for name, _ in trained],
                                                TOLERANCES.get(dtype, TOLERANCES[torch.float32]))
        if difference is not None:
            return self.lean_loss_off(mode, difference)
        gradients = " and gradients" if training else ""
        logger.info(f"The lean loss computes the {mode} loss without the full logits: on the first batch it gives "
                    f"the model's own loss (relative difference {relative:.1g}){gradients}; --no_lean_loss turns it "
                    "off.")
        return True

    def lean_loss_off(self, mode, reason):
        """The model's own forward for the rest of the run, in training and evaluation alike: one line says why."""
        self.lean_decisions = {True: False, False: False}
        logger.warning(f"The lean loss is off ({mode}): {reason}; the model's own forward computes the loss, with "
                       "all its logits at once.")
        return False
