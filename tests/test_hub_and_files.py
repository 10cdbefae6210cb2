"""The hub, remote data files and the datasets cache: a run without network reads its cache at once, and what the
hub, a remote file or the cache's disk refuses ends in one line naming the place, before anything slow, with nothing
lost: the same command, once the place is fixed, ends with the uninterrupted numbers."""

import errno
import gc
import glob
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import datasets
import pytest
from conftest import REPO, assert_refused_in_one_line, read_json, small_file_system, tiny_run_arguments
from datasets.arrow_writer import ArrowWriter

import run_clm
from lmtune.adapter_setup import check_adapter_config
from lmtune.checks import check_data_file
from lmtune.errors import UsageError


def into_hub_cache(folder, cache, repository):
    """folder as the hub client leaves a download in cache: the files of a revision, and the branch naming it."""
    repository = cache / repository
    shutil.copytree(folder, repository / "snapshots" / "0123abcd")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("0123abcd")


def into_datasets_cache(text_file, cache, namespace, name):
    """A text file as datasets keeps a hub dataset that it prepared once: what it reads without network."""
    datasets.load_dataset("text", data_files={"train": str(text_file)}, cache_dir=str(cache / "prepare"),
                          keep_linebreaks=True)  # as run_clm reads a text file
    folder = cache / f"{namespace}___{name}"
    (cache / "prepare" / "text").rename(folder)
    [config] = glob.glob(str(folder / "default-*"))
    os.rename(config, folder / "default")
    [arrow] = glob.glob(str(folder / "default" / "*" / "*" / "text-train.arrow"))
    os.rename(arrow, arrow.replace("text-train", f"{name}-train"))


def saved_adapter(model_folder, folder):
    import adapters
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder)
    adapters.init(model)
    model.add_adapter("clm", config="seq_bn")
    model.save_adapter(str(folder), "clm")
    return folder


@contextmanager
def counting_hub():
    """A hub on the loopback that resets every connection, as a network that is down does: yields its address and
    the list of connections tried, counted."""
    server = socket.create_server(("127.0.0.1", 0))
    connections = []

    def refuse():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            connections.append(1)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # a reset, not a FIN
            connection.close()

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    finally:
        server.close()
        thread.join(timeout=10)


def test_hub_names_in_the_cache_without_network_are_read_from_the_cache_without_a_retry(assets, tmp_path):
    home = tmp_path / "hf-home"
    into_hub_cache(assets.tiny_gpt2, home / "hub", "models--user--tiny-gpt2")
    adapter = saved_adapter(assets.tiny_gpt2, tmp_path / "adapter")
    into_hub_cache(adapter, home / "hub", "models--user--tiny-adapter")
    into_datasets_cache(assets.validation, home / "datasets", "user", "tiny-texts")
    arguments = tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_eval", "--model_name_or_path",
                                   "user/tiny-gpt2", "--load_adapter", "user/tiny-adapter", "--dataset_name",
                                   "user/tiny-texts", train=None, validation=None)
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    with counting_hub() as (endpoint, connections):
        ran = subprocess.run([sys.executable, str(REPO / "run_clm.py"), *arguments], capture_output=True, text=True,
                             env={**environment, "HF_HOME": str(home), "HF_ENDPOINT": endpoint}, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    # The probe that finds the hub unreachable, and nothing after it: each file used to be tried five times.
    assert len(connections) == 1
    assert "Retrying in" not in ran.stdout + ran.stderr
    assert "using the local cache's copies of user/tiny-gpt2, user/tiny-texts, user/tiny-adapter" in ran.stdout
    local = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "local", "--do_eval", "--load_adapter",
                                            adapter, train=assets.validation, validation=None))
    assert read_json(tmp_path / "out" / "all_results.json")["eval_loss"] == pytest.approx(local["eval_loss"],
                                                                                          abs=1e-6)


def test_push_to_hub_in_offline_mode_is_refused_in_one_line(assets, tmp_path, capsys):
    import huggingface_hub

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # as the tests' conftest sets it
    output_dir = tmp_path / "out"
    arguments = tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--push_to_hub", "--hub_model_id",
                                   "user/tiny")
    assert_refused_in_one_line(run_clm, arguments, "--push_to_hub uploads to the Hugging Face Hub, and offline mode "
                               "is set (HF_HUB_OFFLINE)", capsys, output_dir)


@pytest.fixture
def file_server(assets):
    """The assets folder served over HTTP on the loopback, as a remote data file would be."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(assets.folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_data_files_are_found_as_datasets_finds_them_local_or_remote(assets, tmp_path, file_server, monkeypatch):
    monkeypatch.chdir(assets.folder)
    for path in (assets.train, "train.txt", "*.txt", f"{file_server}/train.txt", f"{file_server}/*.txt"):
        check_data_file("--train_file", str(path))  # accepted, as datasets and the examples accept them
    refusals = {
        "missing.txt": "--train_file missing.txt does not exist; check the path.",
        "part-*.txt": "--train_file part-*.txt matches no file; check the pattern.",
        f"{file_server}/missing.txt": f"--train_file {file_server}/missing.txt does not exist there; check the URL.",
        "http://127.0.0.1:9/train.txt": "--train_file http://127.0.0.1:9/train.txt cannot be reached (Cannot connect "
                                        "to host 127.0.0.1:9",
        "hf://datasets/user/texts/train.txt": "--train_file hf://datasets/user/texts/train.txt cannot be reached",
    }
    if importlib.util.find_spec("s3fs") is None:
        refusals["s3://bucket/train.txt"] = "--train_file s3://bucket/train.txt needs a package that is not installed"
    for path, expected in refusals.items():
        with pytest.raises(UsageError) as refused:
            check_data_file("--train_file", path)
        assert str(refused.value).startswith(expected), str(refused.value)


def test_a_remote_data_file_that_cannot_be_reached_is_refused_before_the_model_loads(assets, tmp_path, capsys):
    output_dir = tmp_path / "out"
    assert_refused_in_one_line(run_clm, tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--train_file",
                                                           "https://127.0.0.1:9/corpus/train.txt"),
                               "--train_file https://127.0.0.1:9/corpus/train.txt cannot be reached", capsys,
                               output_dir)


@pytest.mark.parametrize("content, expected", [
    ({"architecture": "lora", "r": 4, "dropuot": 0.1}, "LoRAConfig has no setting 'dropuot' (did you mean dropout?)"),
    ({"architecture": "union", "configs": [{"architecture": "lora", "r": 4},
                                           {"architecture": "prefix_tuning", "prefix_lenght": 8}]},
     "PrefixTuningConfig has no setting 'prefix_lenght' (did you mean prefix_length?)"),
    ({"config": {"architecture": "lora", "alpa": 4}, "name": "clm"}, "LoRAConfig has no setting 'alpa'"),
])
def test_an_unknown_key_in_an_adapter_config_file_is_refused_naming_the_key_and_the_file(assets, tmp_path, capsys,
                                                                                         content, expected):
    config_file = tmp_path / "adapter.json"
    config_file.write_text(json.dumps(content))
    output_dir = tmp_path / "out"
    assert_refused_in_one_line(run_clm, tiny_run_arguments(run_clm, assets, output_dir, "--do_train",
                                                           "--train_adapter", "--adapter_config", config_file),
                               f"--adapter_config {config_file}: {expected}", capsys, output_dir)


def test_adapter_config_files_that_adapters_writes_are_accepted(tmp_path):
    from adapters import AdapterConfig

    for name in ("lora", "seq_bn", "mam", "unipelt", "loreft", "prompt_tuning"):
        config_file = tmp_path / f"{name}.json"
        config_file.write_text(json.dumps(AdapterConfig.load(name).to_dict()))
        check_adapter_config(str(config_file))
    saved = tmp_path / "saved.json"  # the adapter_config.json saved beside an adapter's weights
    saved.write_text(json.dumps({"config": AdapterConfig.load("lora").to_dict(), "name": "clm", "version": "x"}))
    check_adapter_config(str(saved))


@pytest.mark.parametrize("flags, expected", [
    (["--use_liger_kernel"], "--use_liger_kernel needs the liger-kernel package"),
    (["--torch_compile", "--torch_compile_backend", "tensorrt"],
     "--torch_compile_backend tensorrt needs the torch_tensorrt package"),
    (["--torch_compile", "--torch_compile_backend", "no_such_backend"],
     "--torch_compile_backend no_such_backend is not a torch.compile backend here; use one of"),
    (["--deepspeed", "DS_CONFIG"], "--deepspeed DS_CONFIG needs a package that is not installed"),
    (["--half_precision_backend", "apex"], "--half_precision_backend apex needs a package that is not installed"),
])
def test_a_trainer_flag_whose_package_is_missing_is_refused_in_one_line(assets, tmp_path, capsys, flags, expected):
    packages = {"--use_liger_kernel": "liger_kernel", "tensorrt": "torch_tensorrt", "--deepspeed": "deepspeed",
                "apex": "apex"}
    package = next((packages[flag] for flag in flags if flag in packages), None)
    if package and importlib.util.find_spec(package) is not None:
        pytest.skip(f"checks a machine without {package}")
    ds_config = tmp_path / "ds_config.json"
    ds_config.write_text("{}")
    flags = [str(ds_config) if flag == "DS_CONFIG" else flag for flag in flags]
    output_dir = tmp_path / "out"
    assert_refused_in_one_line(run_clm, tiny_run_arguments(run_clm, assets, output_dir, "--do_train", *flags),
                               expected.replace("DS_CONFIG", str(ds_config)), capsys, output_dir)


# The fault matrix's cells of the datasets cache: each way a write there fails, where the run writes there (preparing
# the data files, then tokenizing and grouping them).
FACES = {
    "errno 28": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "a Rust library's os error 28": lambda: Exception("No space left on device (os error 28)"),
    "read-only": lambda: OSError(errno.EROFS, "Read-only file system"),
    "permission denied": lambda: PermissionError(errno.EACCES, "Permission denied"),
}
# ArrowWriter writes the prepared data files as tables, and the tokenized batches as batches.
PLACES = {"preparing the data": "write_table", "tokenizing": "write_batch"}


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    return run_clm.main(cache_run_arguments(assets, folder))


def cache_run_arguments(assets, folder):
    # The small validation corpus as training data, with validation held out of it: little to tokenize.
    return tiny_run_arguments(run_clm, assets, folder / "out", "--do_train", "--do_eval", "--max_steps", "2",
                              "--train_adapter", "--cache_dir", folder / "cache", train=assets.validation,
                              validation=None)


def assert_cell(assets, tmp_path, capsys, uninterrupted, fault, expected):
    """With fault on, the run ends in one line naming the cache and expected, leaving nothing; with it off, the same
    command gives the uninterrupted run's numbers."""
    arguments = cache_run_arguments(assets, tmp_path)
    with fault():
        capsys.readouterr()
        assert run_clm.cli(arguments) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1].startswith(f"run_clm.py: error: Could not write {tmp_path / 'cache'}"), stderr[-1]
    assert expected in stderr[-1] and "fix the file" not in stderr[-1] and "--output_dir" not in stderr[-1]
    assert not any("Traceback" in line for line in stderr)
    assert not (tmp_path / "out").exists()
    metrics = run_clm.main(arguments)
    for key in ("train_loss", "eval_loss"):
        assert metrics[key] == pytest.approx(uninterrupted[key], abs=1e-6)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("place", PLACES)
def test_a_datasets_cache_that_refuses_a_write_is_named_and_the_rerun_completes(assets, tmp_path, capsys,
                                                                                uninterrupted, monkeypatch, place,
                                                                                face):
    @contextmanager
    def fault():
        def refuse(*args, **kwargs):
            raise FACES[face]()

        with monkeypatch.context() as patch:
            patch.setattr(ArrowWriter, PLACES[place], refuse)
            yield

    expected = f"while {'loading --train_file' if place == 'preparing the data' else 'tokenizing and grouping'}"
    assert_cell(assets, tmp_path, capsys, uninterrupted, fault, expected)


def test_datasets_own_disk_space_error_names_the_cache_not_the_data_file(assets, tmp_path, capsys, uninterrupted,
                                                                         monkeypatch):
    @contextmanager
    def fault():  # datasets finds less free space than the data needs, and says so in its own words
        with monkeypatch.context() as patch:
            patch.setattr(datasets.builder, "has_sufficient_disk_space", lambda *args, **kwargs: False)
            yield

    assert_cell(assets, tmp_path, capsys, uninterrupted, fault, "while loading --train_file")


def test_a_full_disk_while_tokenizing_names_the_datasets_cache(assets, tmp_path, capsys, uninterrupted):
    with small_file_system(tmp_path / "cache", "64m") as resize:
        # The data prepared as the run prepares it, so that the run goes on to tokenize it.
        datasets.load_dataset("text", data_files={"train": str(assets.validation)},
                              cache_dir=str(tmp_path / "cache"), keep_linebreaks=True)
        used = shutil.disk_usage(tmp_path / "cache").used

        @contextmanager
        def fault():
            resize(f"{used // 1024 + 64}k")  # room for the prepared data, not for its tokens
            try:
                yield
            finally:
                resize("64m")

        try:
            assert_cell(assets, tmp_path, capsys, uninterrupted, fault, "while tokenizing and grouping")
        finally:
            gc.collect()  # the runs' datasets map their files in the cache, which cannot be unmounted while they do


@pytest.mark.parametrize("where", ["--cache_dir FILE", "--cache_dir FILE/sub"])
def test_a_file_where_the_cache_folder_goes_is_refused_in_one_line(assets, tmp_path, capsys, where):
    (tmp_path / "file").write_text("not a folder")
    cache = where.split()[1].replace("FILE", str(tmp_path / "file"))
    output_dir = tmp_path / "out"
    assert_refused_in_one_line(run_clm, tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--cache_dir",
                                                           cache),
                               f"--cache_dir {cache} cannot be a folder: {tmp_path / 'file'} is a file", capsys,
                               output_dir)
    assert (tmp_path / "file").read_text() == "not a folder"
