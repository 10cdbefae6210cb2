"""The house: what both scripts do lives once, in lmtune/; each script holds its objective and reads like the
upstream example, its main() a table of contents of the same phases in the same order."""

import ast

from conftest import REPO

SCRIPTS = ("run_clm.py", "run_mlm.py")
# The entry points of a script, which every script defines the same way: a command line, and TPU spawners' _mp_fn.
ENTRY_POINTS = {"cli", "_mp_fn", "logger"}


def top_level_definitions(path):
    source = path.read_text()
    definitions = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    definitions[target.id] = ast.get_source_segment(source, node)
    return definitions


def calls_in_main(path):
    main = next(node for node in ast.parse(path.read_text()).body
                if isinstance(node, ast.FunctionDef) and node.name == "main")
    calls = [node for node in ast.walk(main) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    return [node.func.id for node in sorted(calls, key=lambda node: (node.lineno, node.col_offset))]


def test_no_definition_is_written_in_both_scripts():
    clm, mlm = (top_level_definitions(REPO / script) for script in SCRIPTS)
    twins = {name for name in clm.keys() & mlm.keys() if clm[name] == mlm[name]} - ENTRY_POINTS
    assert not twins, "defined twice: move these into lmtune/"
    assert len(clm) > 10 and len(mlm) > 10  # the comparison sees the scripts' definitions


def test_the_scripts_main_call_the_shared_phases_in_the_same_order():
    clm, mlm = (calls_in_main(REPO / script) for script in SCRIPTS)
    shared = set(clm) & set(mlm)
    assert [name for name in clm if name in shared] == [name for name in mlm if name in shared]
    # The phases of the upstream examples, in their order, are among them.
    phases = ["parse_arguments", "check_arguments", "load_config", "load_raw_datasets", "load_model", "setup_adapter",
              "preprocess", "build_trainer", "train", "evaluate", "publish", "print_summary"]
    assert [name for name in clm if name in phases] == phases


def test_the_package_never_imports_a_script():
    for module in (REPO / "lmtune").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not {name.split(".")[0] for name in names if name} & {"run_clm", "run_mlm"}, module.name


def test_no_function_takes_more_than_seven_parameters():
    # A phase that needs more takes the objective, which holds what a script's kind of language modeling hands in.
    crowded = []
    for path in (REPO / "run_clm.py", REPO / "run_mlm.py", *(REPO / "lmtune").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [argument.arg for argument in (*node.args.posonlyargs, *node.args.args,
                                                       *node.args.kwonlyargs)]
                if len([name for name in names if name not in ("self", "cls")]) > 7:
                    crowded.append(f"{path.name}:{node.name}")
    assert not crowded


def test_every_module_of_the_package_says_what_it_holds():
    modules = sorted((REPO / "lmtune").glob("*.py"))
    assert len(modules) > 20
    for module in modules:
        assert ast.get_docstring(ast.parse(module.read_text())), f"{module.name} has no docstring"
