"""run_clm.py and run_mlm.py are twins: every definition they share is the same text, except those listed here.

Each script stays standalone, so that users can copy one file; the price is that a fix made in one must be made in
the other. This test is what makes a forgotten twin fail, the way "Copied from" checks guard the Hugging Face
examples. A definition allowed to differ says why; `diff run_clm.py run_mlm.py` then shows only the objective.
"""

import ast

from conftest import REPO

# Shared names whose text differs, each for a reason of the objective (causal vs masked language modeling).
ALLOWED_TO_DIFFER = {
    "ModelArguments": "the example model types in --model_type's help",
    "DataTrainingArguments": "--block_size vs --max_seq_length; --keep_linebreaks vs the masking and line flags",
    "AdapterGroupArguments": "the default adapter name, clm or mlm",
    "check_model_arguments": "the example model types in the message",
    "check_data_arguments": "the length flag's name, and --mlm_probability",
    "load_data_files": "--keep_linebreaks for .txt files, a causal LM option",
    "load_tokenizer": "a masked LM needs a mask token",
    "load_model": "AutoModelForCausalLM vs AutoModelForMaskedLM",
    "preprocess": "--line_by_line and the special-tokens mask that masking needs",
    "group_texts": "causal LM labels are the inputs",
    "no_block_message": "--line_by_line has lines, not blocks",
    "preprocess_logits_for_metrics": "a causal LM's logits predict the next token's loss",
    "compute_metrics": "next-token accuracy vs accuracy on masked tokens",
    "build_data_collator": "masking",
    "build_trainer": "the masking collator follows the epoch as a callback",
    "publish": "the model card's task",
    "main": "the masked LM's validation masks; block_size vs max_seq_length",
    "EvaluationArguments": "what a sample is: a continued prompt or filled masks",
    "sample_prompt": "a prompt to continue vs tokens to mask",
    "complete_sample": "greedy continuation vs the top prediction for each mask",
}


def top_level_definitions(path):
    source = path.read_text()
    definitions = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [target.id for target in node.targets if isinstance(target, ast.Name)]
        else:
            continue
        for name in names:
            definitions[name] = ast.get_source_segment(source, node)
    return definitions


def test_shared_definitions_are_identical_except_the_listed_ones():
    clm = top_level_definitions(REPO / "run_clm.py")
    mlm = top_level_definitions(REPO / "run_mlm.py")
    shared = clm.keys() & mlm.keys()
    differ = {name for name in shared if clm[name] != mlm[name]}
    assert not differ - ALLOWED_TO_DIFFER.keys(), "twins out of step: make these the same in both scripts"
    # An entry whose twins became identical, or that one script dropped, must leave the list: it would hide drift.
    assert not ALLOWED_TO_DIFFER.keys() - differ, "identical again or gone: remove from ALLOWED_TO_DIFFER"
    assert len(shared) > 40  # the guard compares the bulk of each script, not a handful of names


def test_phases_run_in_the_same_order():
    def calls_in_main(path):
        main = next(node for node in ast.parse(path.read_text()).body
                    if isinstance(node, ast.FunctionDef) and node.name == "main")
        return [node.func.id for statement in main.body for node in ast.walk(statement)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]

    renamed = {"choose_max_seq_length": "choose_block_size"}
    clm = calls_in_main(REPO / "run_clm.py")
    mlm = [renamed.get(name, name) for name in calls_in_main(REPO / "run_mlm.py")]
    objective_only = {"mask_eval_dataset", "tokens_per_example"}
    assert [name for name in mlm if name not in objective_only] == clm
