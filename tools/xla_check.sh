#!/usr/bin/env bash
# Check run_clm.py and run_mlm.py on the torch_xla (TPU) path, on XLA's CPU device (PJRT_DEVICE=CPU): no TPU needed.
#
#   tools/xla_check.sh [WORK_DIR]
#
# 1. builds a virtual environment with torch_xla (XLA_VENV, default .xla-venv in the repository; skipped if it
#    already imports torch_xla); PyPI's torch 2.9.0 for Linux is the CUDA build, with ~3 GB of nvidia-* wheels: ~7.6 GB in all;
# 2. builds the tiny assets (tools/make_tiny_assets.py --models) in WORK_DIR (default: a new temporary folder);
# 3. runs through tools/xla_spawn.py, as a TPU run would, with the scripts' default flags (the samples of
#    --num_samples 3 are skipped on XLA in one line): an adapter training of each script, with transformers' default
#    optimizer (no --optim) and checkpoints; a resume from a checkpoint; evaluations; --push_to_hub to a local fake
#    hub; run_mlm with --line_by_line --pad_to_max_length; an explicit --optim adamw_torch_fused (refused in one line);
# 4. reloads each saved (and the pushed) adapter in plain CPU torch (CPU_PYTHON, default: python, the project's environment) and
#    compares the evaluation loss with the one computed on XLA (within 1e-4).
# Exits non-zero at the first failed check.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
XLA_VENV=${XLA_VENV:-$REPO/.xla-venv}
CPU_PYTHON=${CPU_PYTHON:-python}
WORK=${1:-$(mktemp -d -t xla-check-XXXXXX)}
mkdir -p "$WORK"
XLA_PYTHON=$XLA_VENV/bin/python
export PJRT_DEVICE=CPU OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=$WORK/hf-home TRANSFORMERS_NO_ADVISORY_WARNINGS=1

fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo; echo "== $* ($(date +%T))"; }

step "virtual environment $XLA_VENV"
if [ -x "$XLA_PYTHON" ] && "$XLA_PYTHON" -c "import torch_xla" 2>/dev/null; then
    echo "exists, torch_xla imports: skipped"
else
    start=$SECONDS
    python3 -m venv "$XLA_VENV"
    "$XLA_VENV/bin/pip" install -q --upgrade pip
    "$XLA_VENV/bin/pip" install -q torch==2.9.0 torch_xla==2.9.0
    # The project's requirements (torch 2.9.0 satisfies them) and the test runner.
    "$XLA_VENV/bin/pip" install -q -r "$REPO/requirements.txt" pytest pytest-xdist
    echo "built in $((SECONDS - start)) s"
fi
"$XLA_PYTHON" -c "import torch, torch_xla, transformers, adapters; print('torch', torch.__version__, '| torch_xla',
torch_xla.__version__, '| transformers', transformers.__version__, '| adapters', adapters.__version__)"

step "tiny assets in $WORK/assets"
"$CPU_PYTHON" "$REPO/tools/make_tiny_assets.py" "$WORK/assets" --models >/dev/null
A=$WORK/assets
# A GPT-2 without dropout for the resume check: the Trainer restores XLA's random seed only after the device loader
# has fetched the first batch, which advances that seed (a graph sync), so with dropout a resumed run draws other
# masks than the uninterrupted one on XLA, and the two cannot be compared exactly.
"$CPU_PYTHON" -c "import sys; sys.path.insert(0, sys.argv[1]); import make_tiny_assets as m; m.build_model('gpt2',
sys.argv[2] + '/gpt2-tokenizer', sys.argv[2] + '/tiny-gpt2-nodrop', resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)" \
    "$REPO/tools" "$A" >/dev/null

# xla RUN_NAME SCRIPT ARGS...: run SCRIPT on XLA's CPU device, output in $WORK/RUN_NAME, log in $WORK/RUN_NAME.log.
xla() {
    local name=$1 script=$2
    shift 2
    local start=$SECONDS
    "$XLA_PYTHON" "$REPO/tools/xla_spawn.py" "$REPO/$script" --output_dir "$WORK/$name" \
        --report_to none --disable_tqdm true --seed 7 "$@" >"$WORK/$name.log" 2>&1 || {
        local status=$?; tail -20 "$WORK/$name.log" >&2; fail "$name: $script exited with status $status"; }
    echo "$name: $script on XLA, $((SECONDS - start)) s"
}
# cpu_reload RUN_NAME SCRIPT ADAPTER ARGS...: evaluate the saved ADAPTER in plain CPU torch, output in $WORK/RUN_NAME.
cpu_reload() {
    local name=$1 script=$2 adapter=$3
    shift 3
    "$CPU_PYTHON" "$REPO/$script" --load_adapter "$adapter" --do_eval --output_dir "$WORK/$name" --report_to none \
        --disable_tqdm true --num_samples 0 --seed 7 "$@" >"$WORK/$name.log" 2>&1 || {
        local status=$?; tail -20 "$WORK/$name.log" >&2; fail "$name: CPU evaluation of $adapter exited with status $status"; }
}
# check PYTHON_CODE: a Python assertion on the runs' outputs (W is $WORK as a Path; metrics(name) reads all_results).
check() {
    "$CPU_PYTHON" - "$WORK" "$1" <<'EOF' || fail "$2"
import json, sys
from pathlib import Path
W = Path(sys.argv[1])
metrics = lambda name: json.loads((W / name / "all_results.json").read_text())
exec(sys.argv[2])
EOF
    echo "ok: $2"
}
# same_on_cpu XLA_RUN CPU_RUN ADAPTER_NAME DESCRIPTION: the XLA run saved the adapter alone, and its reload in plain
# CPU torch evaluates to the XLA run's eval loss (within 1e-4).
same_on_cpu() {
    check "
a, b = metrics('$1')['eval_loss'], metrics('$2')['eval_loss']
files = sorted(p.name for p in (W / '$1' / '$3').iterdir())
assert files == ['adapter.safetensors', 'adapter_config.json', 'pytorch_adapter.bin'], files
assert abs(a - b) < 1e-4, (a, b)
print('   XLA %.6f, CPU %.6f' % (a, b))
" "$4"
}

CLM=(--model_name_or_path "$A/tiny-gpt2-nodrop" --train_file "$A/code_train.txt" --validation_file "$A/code_validation.txt"
     --block_size 32 --per_device_train_batch_size 4 --max_train_samples 64 --max_eval_samples 16 --learning_rate 1e-2
     --train_adapter --adapter_config seq_bn)
MLM=(--model_name_or_path "$A/tiny-roberta" --train_file "$A/code_train.txt" --validation_file "$A/code_validation.txt"
     --max_seq_length 32 --per_device_train_batch_size 4 --max_train_samples 64 --max_eval_samples 16
     --learning_rate 1e-2 --train_adapter --adapter_config seq_bn)

step "run_clm: adapter training with the default optimizer, checkpoints every 2 steps, evaluation"
xla clm run_clm.py "${CLM[@]}" --do_train --do_eval --max_steps 4 --save_strategy steps --save_steps 2 --log_level info
grep -q "Training with --optim adamw_torch: transformers' default, adamw_torch_fused, has no XLA kernel." \
    "$WORK/clm.log" || fail "clm: the line about the optimizer chosen for XLA is missing"
echo "ok: logged the optimizer chosen for XLA"
saved=$(grep -o "saved adapter: .*" "$WORK/clm.log") || fail "clm: no saved adapter line in the summary"
[[ $saved == "saved adapter: $WORK/clm/clm ("* && $saved != *"(0.00 MB)" ]] || fail "clm: summary says: $saved"
echo "ok: summary: $saved"
grep -q "No samples on XLA (TPUs)" "$WORK/clm.log" && [ ! -e "$WORK/clm/samples.jsonl" ] \
    || fail "clm: the default --num_samples 3 on XLA was not skipped with its line"
echo "ok: the default samples skipped on XLA, in one line"
check '
for folder in (W / "clm", W / "clm/checkpoint-2", W / "clm/checkpoint-4"):
    files = sorted(p.name for p in (folder / "clm").iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json", "pytorch_adapter.bin"], folder
    assert not list(folder.glob("model*.safetensors")) and not (folder / "config.json").exists(), folder
' "the adapter alone, in clm/clm/ and in each checkpoint's clm/; no model weights saved"
check '
from safetensors.torch import load_file
final, step2 = (load_file(W / "clm" / f / "clm/adapter.safetensors") for f in (".", "checkpoint-2"))
assert final.keys() == step2.keys() and any((final[k] - step2[k]).abs().max() > 0 for k in final)
' "checkpoint-2 and the final adapter hold the weights of their steps (they differ)"

step "run_clm: resume from a copy of checkpoint-2 to step 4"
mkdir -p "$WORK/clm-resumed" && cp -r "$WORK/clm/checkpoint-2" "$WORK/clm-resumed/"
xla clm-resumed run_clm.py "${CLM[@]}" --do_train --do_eval --max_steps 4 --save_strategy steps --save_steps 2 \
    --log_level info
grep -q "Resuming training from $WORK/clm-resumed/checkpoint-2" "$WORK/clm-resumed.log" || fail "clm-resumed: no resume"
check '
from safetensors.torch import load_file
a, b = metrics("clm"), metrics("clm-resumed")
for key in ("train_loss", "eval_loss"):
    assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
x, y = (load_file(W / f / "clm/adapter.safetensors") for f in ("clm", "clm-resumed"))
assert max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-5
print("   train_loss / eval_loss: uninterrupted %.6f / %.6f, resumed %.6f / %.6f"
      % (a["train_loss"], a["eval_loss"], b["train_loss"], b["eval_loss"]))
' "the resumed run ends where the uninterrupted one did (train_loss, eval_loss, adapter within 1e-5)"

step "run_clm: the saved adapter evaluated in plain CPU torch"
cpu_reload clm-cpu run_clm.py "$WORK/clm/clm" --model_name_or_path "$A/tiny-gpt2-nodrop" \
    --validation_file "$A/code_validation.txt" --block_size 32 --max_eval_samples 16
same_on_cpu clm clm-cpu clm "CPU eval loss of the reloaded adapter = XLA eval loss (within 1e-4)"

step "run_clm: --push_to_hub on XLA, to a local fake hub; the pushed adapter reloaded in plain CPU torch"
# The hub client writes each repository into $WORK/hub instead of uploading it (as tests/test_best_hub_samples.py
# does); torch_xla runs one process in this one here, so the stand-ins apply to the run.
start=$SECONDS
"$XLA_PYTHON" - "$REPO" "$WORK/hub" "${CLM[@]}" --do_train --do_eval --max_steps 2 --save_strategy no --push_to_hub \
    --hub_model_id user/xla-clm --output_dir "$WORK/clm-push" --report_to none --disable_tqdm true --seed 7 \
    >"$WORK/clm-push.log" 2>&1 <<'EOF' || { tail -20 "$WORK/clm-push.log" >&2; fail "clm-push: exited with an error"; }
import concurrent.futures, runpy, shutil, sys
from pathlib import Path
import huggingface_hub, transformers.trainer
repo, hub = sys.argv[1], Path(sys.argv[2])
sys.path.insert(0, repo)
import lmtune.checks
lmtune.checks.check_hub_is_reachable = lambda *args: True  # HF_HUB_OFFLINE is set, where a push is refused

def upload_folder(self, *, repo_id, folder_path, **kwargs):
    shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)
    done = concurrent.futures.Future()
    done.set_result(None)
    return done

huggingface_hub.HfApi.upload_folder = upload_folder
transformers.trainer.create_repo = lambda repo_id, **kwargs: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")
sys.argv = [f"{repo}/tools/xla_spawn.py", f"{repo}/run_clm.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
EOF
echo "clm-push: run_clm.py on XLA, $((SECONDS - start)) s"
check '
pushed, saved = W / "hub/user/xla-clm", W / "clm-push/clm"
files = sorted(p.name for p in saved.iterdir())
assert files == ["README.md", "adapter.safetensors", "adapter_config.json", "pytorch_adapter.bin"], files
assert sorted(p.name for p in pushed.iterdir()) == files
assert all((pushed / name).read_bytes() == (saved / name).read_bytes() for name in files)
' "the hub holds the files of the final save as written (adapter, config, card)"
cpu_reload clm-push-cpu run_clm.py "$WORK/hub/user/xla-clm" --model_name_or_path "$A/tiny-gpt2-nodrop" \
    --validation_file "$A/code_validation.txt" --block_size 32 --max_eval_samples 16
check '
a, b = metrics("clm-push")["eval_loss"], metrics("clm-push-cpu")["eval_loss"]
assert abs(a - b) < 1e-4, (a, b)
print("   XLA %.6f, CPU %.6f" % (a, b))
' "the pushed adapter, reloaded in CPU torch, evaluates to the XLA eval loss (within 1e-4)"

step "run_mlm: adapter training (grouped texts), evaluation, CPU reload"
xla mlm run_mlm.py "${MLM[@]}" --do_train --do_eval --max_steps 4 --save_strategy no
cpu_reload mlm-cpu run_mlm.py "$WORK/mlm/mlm" --model_name_or_path "$A/tiny-roberta" \
    --validation_file "$A/code_validation.txt" --max_seq_length 32 --max_eval_samples 16
same_on_cpu mlm mlm-cpu mlm "run_mlm: adapter saved; CPU eval loss = XLA eval loss (within 1e-4)"

step "run_mlm: --line_by_line --pad_to_max_length, evaluation, CPU reload"
xla mlm-lines run_mlm.py "${MLM[@]}" --line_by_line --pad_to_max_length --do_train --do_eval --max_steps 4 \
    --save_strategy no
cpu_reload mlm-lines-cpu run_mlm.py "$WORK/mlm-lines/mlm" --model_name_or_path "$A/tiny-roberta" \
    --validation_file "$A/code_validation.txt" --max_seq_length 32 --max_eval_samples 16 --line_by_line \
    --pad_to_max_length
same_on_cpu mlm-lines mlm-lines-cpu mlm \
    "run_mlm --line_by_line --pad_to_max_length: adapter saved; CPU eval loss = XLA eval loss (within 1e-4)"

step "run_clm: an explicit --optim adamw_torch_fused on XLA"
status=0
"$XLA_PYTHON" "$REPO/tools/xla_spawn.py" "$REPO/run_clm.py" "${CLM[@]}" --do_train --max_steps 1 \
    --optim adamw_torch_fused --output_dir "$WORK/fused" --report_to none >"$WORK/fused.log" 2>&1 || status=$?
[ "$status" = 2 ] || fail "fused: exit status $status, expected 2"
grep -q "^run_clm.py: error: --optim adamw_torch_fused has no XLA kernel" "$WORK/fused.log" || fail "fused: message"
! grep -q Traceback "$WORK/fused.log" || fail "fused: a traceback"
echo "ok: refused with status 2: $(grep -o "error: .*" "$WORK/fused.log" | cut -c1-100)..."

echo
echo "ALL XLA CHECKS PASSED (work folder: $WORK)"
