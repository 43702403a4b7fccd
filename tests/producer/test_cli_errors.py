"""Bad input gets one clear line on stderr and a non-zero exit, within seconds."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clipfleet.producer.fleet import free_port

REPO = Path(__file__).resolve().parents[2]


def clipfleet(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # The timeout bounds a hang; it is not a speed assertion.
    return subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=60, env=env)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if l.startswith("clipfleet: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


@pytest.mark.parametrize("command", [["worker", "--broker", "redis://127.0.0.1:1/0"], ["up"]])
def test_unknown_queue(command):
    line = one_error_line(clipfleet(*command, "--queues", "cpu-extract,gpu-clipp"))
    assert "unknown queue gpu-clipp" in line and "cpu-download" in line


def test_unreachable_broker_for_worker():
    port = free_port()  # nothing listens there
    line = one_error_line(clipfleet("worker", "--queues", "cpu-extract", "--broker", f"redis://127.0.0.1:{port}/0"))
    assert f"127.0.0.1:{port}" in line and "unreachable" in line


def test_unreachable_broker_for_run(tmp_path):
    port = free_port()
    (tmp_path / "a.warc.wat.gz").write_bytes(b"")
    line = one_error_line(clipfleet("run", "--wat", str(tmp_path / "a.warc.wat.gz"), "--store", str(tmp_path / "s"),
                                    "--broker", f"redis://127.0.0.1:{port}/0", "--until", "extract"))
    assert "unreachable" in line


def test_unwritable_store_for_run(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "a.warc.wat.gz").write_bytes(b"")
    line = one_error_line(clipfleet("run", "--wat", str(tmp_path / "a.warc.wat.gz"),
                                    "--store", str(tmp_path / "file" / "store"), "--until", "extract"))
    assert "not writable" in line


def test_unwritable_store_for_up(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    line = one_error_line(clipfleet("up", "--store", str(tmp_path / "file" / "store")))
    assert "not writable" in line


def test_detach_without_broker_is_refused(tmp_path):
    (tmp_path / "a.warc.wat.gz").write_bytes(b"")
    line = one_error_line(clipfleet("run", "--wat", str(tmp_path / "a.warc.wat.gz"), "--store", str(tmp_path / "s"), "--detach"))
    assert "--detach needs --broker" in line


def test_misordered_time_limits_are_refused_by_worker(redis_url):
    import os
    env = {**os.environ, "CLIPFLEET_SOFT_TIME_LIMIT": "100", "CLIPFLEET_HARD_TIME_LIMIT": "50"}
    line = one_error_line(clipfleet("worker", "--queues", "cpu-extract", "--broker", redis_url, env=env))
    assert "soft < hard < visibility" in line


def test_bad_flag_value_is_an_argparse_error():
    result = clipfleet("run", "--wat", "x", "--store", "/tmp/x", "--until", "nowhere")
    assert result.returncode == 2 and "invalid choice: 'nowhere'" in result.stderr


def test_status_of_empty_store(tmp_path):
    result = clipfleet("status", "--store", str(tmp_path))
    assert result.returncode == 2 and "holds no run" in result.stdout + result.stderr


def test_every_flag_and_argument_has_help():
    import argparse
    from clipfleet.producer.cli import build_parser

    def missing(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from missing(sub, path + [name])
            elif not action.help and action.dest != "help":
                yield " ".join(path + [action.option_strings[0] if action.option_strings else action.dest])
    assert list(missing(build_parser(), ["clipfleet"])) == []


def test_an_unknown_flag_names_the_close_ones_in_one_line():
    result = clipfleet("run", "--wat", "x", "--store", "/tmp/x", "--threads", "4")
    line = one_error_line(result)
    assert "unknown flag --threads" in line and "--download-threads" in line
    assert len(result.stderr.splitlines()) == 1 and "usage:" not in result.stderr


@pytest.mark.parametrize("args, hint", [
    (["run", "--wat", "x", "--store", "/tmp/x", "--shard-sise", "4"], "did you mean --shard-size?"),
    (["statsu", "--store", "x"], "did you mean status?"),
    (["run", "--wat", "x", "--store", "/tmp/x", "--until", "embd"], "did you mean embed?"),
    (["run", "--store", "/tmp/x"], "one of the arguments --wat --crawl --urls is required"),
    (["run", "--wat", "x", "--store", "/tmp/x", "stray"], "unexpected argument: stray"),
])
def test_argument_errors_are_one_line_with_a_hint(args, hint):
    result = clipfleet(*args)
    line = one_error_line(result)
    assert result.returncode == 2 and hint in line and "--help" in line
    assert len(result.stderr.splitlines()) == 1


def test_until_a_stage_that_does_not_exist_names_the_stages_and_fails(tmp_path, capsys):
    """Every registered stage is built; --until takes only their names, refused before run.json."""
    from clipfleet.producer import cli
    wat = tmp_path / "a.warc.wat.gz"
    wat.write_bytes(b"")
    store = tmp_path / "store"
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--wat", str(wat), "--store", str(store), "--until", "embedd"])
    assert exited.value.code == 2
    assert "invalid choice: 'embedd' (did you mean embed?)" in capsys.readouterr().err
    assert not (store / "run.json").exists()  # refused before the run was registered


@pytest.mark.parametrize("model, message", [
    ("nope.pt", "model file nope.pt does not exist"),
    ("", "no model name given"),
    ("nope", "unknown model 'nope'"),
])
def test_models_eval_errors_are_one_line(model, message):
    line = one_error_line(clipfleet("models", "eval", "--model", model))
    assert message in line


def test_models_eval_names_what_is_wrong_with_a_path(tmp_path):
    from clipfleet.sandbox.evaluate import EvaluationError, check_device, check_model_name
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(EvaluationError, match="does not exist"):
        check_model_name(f"ViT-B-32/{tmp_path}/missing.pt")
    with pytest.raises(EvaluationError, match="does not exist"):
        check_model_name("./missing-folder")
    with pytest.raises(EvaluationError, match=f"as ARCH/{checkpoint}"):
        check_model_name(str(checkpoint))
    check_model_name(f"ViT-B-32/{checkpoint}")  # the form load_clip takes a file in
    check_model_name("shapes")
    check_model_name(str(tmp_path))  # a folder
    with pytest.raises(EvaluationError, match="unknown device"):
        check_device("bogus")


def test_models_eval_of_a_file_that_is_no_checkpoint(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    line = one_error_line(clipfleet("models", "eval", "--model", f"ViT-B-32/{checkpoint}"))
    assert "could not be loaded" in line


def test_a_decontamination_set_that_is_neither_a_folder_nor_a_parquet_of_phashes_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    no_hashes = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"url": ["http://x/a.jpg"]}), no_hashes)
    for given, says in ((tmp_path / "missing", "neither a folder of images nor a parquet"),
                        (no_hashes, "the parquet has no phash column")):
        result = clipfleet("run", "--urls", str(tmp_path / "urls.parquet"), "--store", str(tmp_path / "store"),
                           "--decontaminate", str(given))
        assert says in one_error_line(result)
        assert not (tmp_path / "store" / "run.json").exists()
