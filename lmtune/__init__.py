"""What run_clm.py and run_mlm.py share, in modules of one concern each; each script hands the shared phases its
objective (lmtune.objective.Objective), and the package never imports a script.

- set-up and checks: arguments, checks, hardware, logs, errors, stopping, output_dir
- inputs: hub, data, modeling
- the adapter: interfaces, adapter_setup, adapter_files, trial_step
- training: trainer, callbacks, lean_loss, training, metrics
- what a run writes besides: samples, merge, peft_export, reporting

Importing the package silences one notice of bitsandbytes, which it prints when it is imported (by transformers'
Trainer and by adapters, when the scripts import their modules), before any set-up step of a run could.
"""

from lmtune.logs import silence_bitsandbytes_kernel_notice

# Before any module of the package imports adapters, which imports bitsandbytes wherever it is installed.
silence_bitsandbytes_kernel_notice()
