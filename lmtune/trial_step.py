"""The trial training step: one forward and backward pass on a sentence, before any data is read, which refuses a
method this model cannot train and a model that cannot compute in the chosen dtype."""

import logging

import torch

from lmtune.adapter_setup import cannot_train_message
from lmtune.arguments import quantizes
from lmtune.errors import UsageError, first_line, shorten
from lmtune.hardware import launcher_configures

logger = logging.getLogger(__name__)


# What adapters and the models raise for a method or dtype they cannot compute with, in the trial training step.
TRIAL_STEP_ERRORS = (RuntimeError, ValueError, TypeError, AttributeError, AssertionError, IndexError)


def check_adapter_trains(model, tokenizer, data_collator, model_args, training_args, adapter_args):
    """One forward and backward pass on a sentence: a method this model cannot train is refused now, in seconds,
    and so is a model that cannot compute at all in the chosen dtype, naming the flags that set it."""
    if not adapter_args.train_adapter:
        return
    if model.dtype != torch.float32 and not (training_args.bf16 or training_args.fp16):
        raise UsageError(
            f"--torch_dtype {model_args.torch_dtype} loads the base model in {model.dtype} while the adapter trains "
            "in float32: add --bf16 (or --fp16 on a GPU) to compute in mixed precision, or drop --torch_dtype."
        )
    if places_model_itself(training_args):
        logger.info("The trial training step is left to the first step of training: FSDP and DeepSpeed place the "
                    "model themselves.")
        return
    if model.device.type == "cpu" and training_args.device.type != "cpu" and not quantizes(model_args):
        model.to(training_args.device)  # where the Trainer would put it: the step computes where training will
    example = tokenizer("Adapters are checked on one short sentence before any training starts.")
    example["labels"] = list(example["input_ids"])
    random_state = torch.get_rng_state()
    batch = {name: tensor.to(model.device) for name, tensor in data_collator([example]).items()}
    model.eval()  # no dropout: the check draws no random numbers that training would have drawn
    try:
        with half_precision_autocast(model):
            model(**batch).loss.backward()
    except TRIAL_STEP_ERRORS as error:
        if model.dtype != torch.float32 and not runs_without_adapter(model, batch):
            raise UsageError(
                f"The {model.config.model_type} model cannot compute in {model.dtype} here "
                f"({shorten(first_line(error))}); check --torch_dtype, --bf16/--fp16 and --use_cpu."
            ) from None
        raise UsageError(cannot_train_message(adapter_args, model, error)) from None
    finally:
        torch.set_rng_state(random_state)
        model.train()
    reached = any(parameter.grad is not None for parameter in model.parameters() if parameter.requires_grad)
    model.zero_grad(set_to_none=True)
    if not reached:
        raise UsageError(cannot_train_message(
            adapter_args, model, "none of its weights reach the loss: its settings leave out every layer, or it "
            "sits under a language adapter that only the first adapter of a stack can use"))


def places_model_itself(training_args):
    """Whether FSDP or DeepSpeed will place (and shard) the model, rather than the Trainer moving it whole."""
    launcher = launcher_configures("FSDP") or launcher_configures("DeepSpeed")
    return bool(training_args.fsdp or training_args.deepspeed or launcher)


def half_precision_autocast(model):
    # A base model loaded in half precision trains under autocast (--bf16/--fp16); the check computes in the base
    # model's dtype, on its device.
    return torch.autocast(model.device.type, dtype=model.dtype, enabled=model.dtype in (torch.bfloat16, torch.float16))


def runs_without_adapter(model, batch):
    """Whether the base model alone computes the batch: if not, the adapter is not what fails."""
    active = model.active_adapters
    model.set_active_adapters(None)
    try:
        with torch.no_grad(), half_precision_autocast(model):
            model(input_ids=batch["input_ids"])
    except TRIAL_STEP_ERRORS:
        return False
    finally:
        model.set_active_adapters(active)
    return True
