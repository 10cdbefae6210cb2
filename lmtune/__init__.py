"""What run_clm.py and run_mlm.py share, by concern; each script hands in what its objective needs.

- arguments: the argument groups both scripts share, the parser and its --help
- checks: the up-front checks of the arguments
- output_dir: the output folder's lock, its checkpoints and resuming
- data: reading raw data, and turning texts into examples
- modeling: config, tokenizer, model, quantization and example length
- adapter_setup: adapters.init, interfaces, new and saved adapters, the trial training step
- training: the Trainer subclasses, adapter saving, train and evaluate
- metrics: per-token losses, accuracy and perplexity
- reporting: samples, merging, the hub, the plot and the summary
- peft_export: --export_peft, the LoRA adapter in PEFT's layout
- stopping: SIGTERM, SIGUSR1 and Ctrl-C, for the whole run and its worker processes
- errors, logs, hardware: one-line errors, silenced noise, what the machine has
"""

from lmtune.logs import silence_bitsandbytes_kernel_notice

# Before any module of the package imports adapters, which imports bitsandbytes wherever it is installed.
silence_bitsandbytes_kernel_notice()
