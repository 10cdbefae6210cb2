"""The Hugging Face Hub: whether it can be reached and what its local cache holds, decided before anything loads;
the model card, and the push of the trained adapter."""

import logging
import os

import datasets
import huggingface_hub
import transformers
from datasets.load import CachedDatasetModuleFactory
from huggingface_hub import ModelCardData, try_to_load_from_cache

from lmtune.errors import UsageError
from lmtune.logs import log_message_dropped
from lmtune.metrics import perplexity
from lmtune.output_dir import writing

logger = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 5  # how long a run waits to learn whether the Hugging Face Hub can be reached
# The file that each flag's hub repository cannot be loaded without, any one of those listed, as the libraries look
# for it in the local cache; adapters reads an adapter from the hub's default cache, not from --cache_dir.
HUB_FILES = {"--model_name_or_path": ("config.json",), "--config_name": ("config.json",),
             "--tokenizer_name": ("tokenizer_config.json", "config.json"),
             "--load_adapter": ("adapter_config.json",), "--load_lang_adapter": ("adapter_config.json",)}


def publish(objective, trainer, model_args, data_args):
    """Write a model card for the objective's task (a hub pipeline tag), and push to the hub when --push_to_hub asks
    for it."""
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": objective.hub_task}
    if data_args.dataset_name is not None:
        card["dataset_tags"] = data_args.dataset_name
        card["dataset"] = " ".join(filter(None, [data_args.dataset_name, data_args.dataset_config_name]))
    if trainer.args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        with writing("the model card", trainer.args):
            trainer.create_model_card(**card)


def adapter_card(trainer, card):
    """The hub repository's README.md: what the adapter adapts, how well it did, and how to load it."""
    model = trainer.model
    # The Trainer's save_model pushes too, without the card's details, which publish() fills in afterwards.
    base_model = card.get("finetuned_from") or model.name_or_path
    metadata = ModelCardData(
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,  # the hub takes hub names
        library_name="adapter-transformers",
        pipeline_tag=card.get("tasks"),
        tags=[tag for tag in ("adapter-transformers", model.config.model_type, card.get("tasks")) if tag],
        datasets=card.get("dataset_tags"),
    )
    method = type(model.adapters_config.get(trainer.adapter_name)).__name__
    trained_on = f" on {card['dataset']}" if card.get("dataset") else ""
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    results = ""
    if evaluations:
        last = evaluations[-1]
        results = f"Evaluation: loss {last['eval_loss']:.4f}, perplexity {perplexity(last['eval_loss']):.2f}"
        results += f", accuracy {last['eval_accuracy']:.4f}.\n\n" if "eval_accuracy" in last else ".\n\n"
    model_class = type(model).__name__
    base_name = base_model or "path/to/the/base/model"  # a model built from scratch has no name to load it by
    return (
        f"---\n{metadata.to_yaml()}\n---\n\n# {trainer.hub_model_id}\n\n"
        f"An adapter of the [adapters](https://docs.adapterhub.ml) library ({method}, settings in "
        f"`adapter_config.json`) for `{base_name}`, trained with `{trainer.script_name}`{trained_on}. The base "
        f"model stays as it is: load it, then the adapter.\n\n{results}"
        f"```python\nimport adapters\nfrom transformers import {model_class}\n\n"
        f'model = {model_class}.from_pretrained("{base_name}")\nadapters.init(model)\n'
        f'model.load_adapter("{trainer.hub_model_id}", set_active=True)\n```\n'
    )


def check_hub_is_reachable(model_args, data_args, adapter_args, training_args):
    """Without network, a hub name that is not in the local cache, or --push_to_hub, fails now in one line, not
    after half a minute of retries and a screen of logs. Whether the run can use the hub: False where it cannot be
    reached but the local cache holds every hub name given."""
    offline = "offline mode is set (HF_HUB_OFFLINE)"
    if training_args.push_to_hub and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UsageError(push_refusal(offline))
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return True  # the libraries go straight to the local cache, and name what is missing there
    hub_names = [(flag, name) for flag, name in (
        ("--model_name_or_path", model_args.model_name_or_path),
        ("--config_name", model_args.config_name),
        ("--tokenizer_name", model_args.tokenizer_name),
        ("--dataset_name", data_args.dataset_name),
        ("--load_adapter", adapter_args.load_adapter),
        ("--load_lang_adapter", adapter_args.load_lang_adapter),
    ) if name and not os.path.exists(name)]
    if not (hub_names or training_args.push_to_hub):
        return True
    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        huggingface_hub.get_session().head(endpoint, timeout=HUB_PROBE_SECONDS)
    except OSError as error:  # requests' errors: no connection, or no answer within HUB_PROBE_SECONDS
        unreachable = f"the Hugging Face Hub ({endpoint}) cannot be reached ({type(error).__name__})"
        if training_args.push_to_hub:
            raise UsageError(push_refusal(unreachable)) from None
        uncached = [(flag, name) for flag, name in hub_names if not in_hub_cache(flag, name, model_args)]
        if uncached:
            flag, name = uncached[0]
            raise UsageError(
                f"{flag} {name} is not a local folder, and {unreachable}; give a local folder, or run once with "
                "network to put it into the local cache."
            ) from None
        logger.warning(f"{unreachable[0].upper()}{unreachable[1:]}: using the local cache's copies of "
                       f"{', '.join(name for _, name in hub_names)}.")
        return False
    return True


def push_refusal(reason):
    return (f"--push_to_hub uploads to the Hugging Face Hub, and {reason}; run again with network (and without "
            "HF_HUB_OFFLINE), or drop --push_to_hub (the output folder holds everything it would upload).")


def in_hub_cache(flag, name, model_args):
    """Whether the local cache holds what the libraries load the hub name of flag from without network: a hub
    download of the repository's revision for transformers and adapters, a prepared copy for datasets."""
    if flag == "--dataset_name":
        # datasets' own fallback; it announces the cached copy, which the load will do again.
        with log_message_dropped("datasets.load", "Using the latest cached version"):
            try:
                CachedDatasetModuleFactory(name, cache_dir=model_args.cache_dir).get_module()
            except (FileNotFoundError, AssertionError):  # it asserts a hub name's form: at most one "/"
                return False
        return True
    adapter = flag in ("--load_adapter", "--load_lang_adapter")
    return any(isinstance(try_to_load_from_cache(
        name, filename, cache_dir=None if adapter else model_args.cache_dir,
        revision=None if adapter else model_args.model_revision), str) for filename in HUB_FILES[flag])


def use_local_cache_only():
    """Switch huggingface_hub, transformers and datasets to offline mode for the rest of the run, as HF_HUB_OFFLINE=1
    does when they are imported: each load then reads the local cache at once, where the libraries would try every
    file on the hub first, with retries and backoff (minutes for a run of seconds)."""
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    huggingface_hub.utils.reset_sessions()  # the sessions made so far still go out to the network
    transformers.utils.hub._is_offline_mode = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
