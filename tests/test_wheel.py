"""The wheel users install: built by `make wheel` (here with the one build for the dev
torch; scripts/torch-matrix.sh checks the full wheel under every supported torch),
checked (tag, size, layout, linked libraries), installed into a fresh venv that already
has the user's torch, and run there: torch left as it was, the README quick start
without the demo extra, a CeRA adapter loaded through PEFT without `import cera_rs`, the
demo refusing to start without its extra, then the demo with it. Several minutes (torch
alone is a 4.7 GB install), so it runs once."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
MAX_BYTES = 5 * 2**20
TORCH = torch.__version__.split("+")[0]
MINOR = ".".join(TORCH.split(".")[:2])


def sh(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


def ok(*args, **kwargs) -> str:
    run = sh(*args, **kwargs)
    assert run.returncode == 0, f"{args}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def glibc_needed(binary: Path) -> tuple[int, int]:
    """The newest GLIBC_x.y symbol version the binary needs."""
    found = re.findall(r"GLIBC_(\d+)\.(\d+)", ok("objdump", "-T", str(binary)))
    return max((int(a), int(b)) for a, b in found)


@pytest.fixture(scope="module")
def wheel() -> Path:
    # The venv `make test` set up is the running interpreter's: reuse it as it is (-o).
    venv = Path(sys.prefix)
    ok(
        "make",
        "--no-print-directory",
        f"VENV={venv}",
        "-o",
        f"{venv}/.installed",
        "wheel",
        f"TORCHES={TORCH}",
        cwd=ROOT,
        timeout=900,
    )
    wheels = sorted((ROOT / "dist").glob("cera_rs-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unpacked")
    zipfile.ZipFile(wheel).extractall(out)
    return out


def test_wheel_tag_size_and_libraries(wheel, unpacked):
    binaries = [p for p in unpacked.rglob("*.so*")]
    build = f"cera_rs/_native_builds/torch-{MINOR}/_native.abi3.so"
    assert [p.relative_to(unpacked).as_posix() for p in binaries] == [build]
    purelib = unpacked / f"cera_rs-{PROJECT['version']}.data" / "purelib"
    assert sorted(p.name for p in purelib.iterdir()) == [
        "_cera_rs_cli.py",
        "_cera_rs_peft_hook.py",
        "cera_rs_peft_hook.pth",
    ]
    major, minor = glibc_needed(binaries[0])
    expected = f"cera_rs-{PROJECT['version']}-cp39-abi3-manylinux_{major}_{minor}_x86_64.whl"
    assert wheel.name == expected
    assert wheel.stat().st_size < MAX_BYTES
    dynamic = ok("readelf", "-d", str(binaries[0]))
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
    # libtorch by soname, found through the torch that is imported first; nothing bundled
    assert {"libtorch_cpu.so", "libc10.so"} <= set(needed)
    assert not [n for n in needed if "/" in n]
    assert "RPATH" not in dynamic and "RUNPATH" not in dynamic
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if ".libs/" in n]
    # exactly the minors it has builds for: pip never installs it beside another torch
    metadata = next(unpacked.glob("cera_rs-*.dist-info")) / "METADATA"
    major, number = MINOR.split(".")
    torch_lines = [
        line
        for line in metadata.read_text().splitlines()
        if line.startswith("Requires-Dist: torch") and ";" not in line
    ]
    assert torch_lines == [f"Requires-Dist: torch>={MINOR},<{major}.{int(number) + 1}"]


def test_torch_requirement_names_exactly_the_minors_built(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from wheel_torch_requirement import requirement, rewrite
    finally:
        sys.path.pop(0)
    assert requirement(["2.11", "2.12", "2.13", "2.14", "2.15"]) == "torch>=2.11,<2.16"
    assert requirement(["2.15", "2.11"]) == "torch>=2.11,<2.16,!=2.12.*,!=2.13.*,!=2.14.*"
    metadata = tmp_path / "METADATA"
    metadata.write_text(
        "Name: cera_rs\nRequires-Dist: torch>=2.11,<2.16\n"
        "Requires-Dist: torchvision>=0.1\n"
        "Requires-Dist: torch==2.11.0 ; extra == 'dev'\n"
    )
    assert rewrite(metadata, ["2.13"]) == "Requires-Dist: torch>=2.13,<2.14"
    assert metadata.read_text() == (
        "Name: cera_rs\nRequires-Dist: torch>=2.13,<2.14\n"
        "Requires-Dist: torchvision>=0.1\n"
        "Requires-Dist: torch==2.11.0 ; extra == 'dev'\n"
    )


def test_fresh_venv_install(wheel, tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    venv = root / "venv"
    try:
        _install_and_run(wheel, root, venv)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # several GB: never left behind


def required_distributions(name: str) -> list[metadata.Distribution]:
    """``name``'s installed distribution and every one it requires here (extras and
    environment markers followed as pip follows them)."""
    found: dict[str, metadata.Distribution] = {}
    todo, seen = [(name, frozenset())], set()
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        dist = metadata.distribution(item[0])
        found[canonicalize_name(dist.metadata["Name"])] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            extras = [""] + sorted(item[1])
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
                todo.append((req.name, frozenset(req.extras)))
    return list(found.values())


def place_torch(venv: Path) -> None:
    """The user's torch in ``venv``: this environment's install of the same torch wheel
    (and of what it requires), hard-linked file by file from their RECORDs into the
    venv's site-packages, as ``pip install torch==TORCH`` would unpack it (console
    scripts left out), in seconds instead of minutes of unpacking 4.7 GB."""
    site = Path(
        ok(
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig as s; print(s.get_path('purelib'))",
        ).strip()
    )
    for dist in required_distributions("torch"):
        for file in dist.files or []:
            source, target = Path(dist.locate_file(file)), site / file
            if not source.is_file() or not target.resolve().is_relative_to(site):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another file system
                shutil.copy2(source, target)
    shown = ok(str(venv / "bin" / "python"), "-m", "pip", "show", "torch")
    assert f"Version: {TORCH}\n" in shown and str(site) in shown, shown


def _install_and_run(wheel: Path, root: Path, venv: Path) -> None:
    ok(sys.executable, "-m", "venv", str(venv))
    py, cli = venv / "bin" / "python", venv / "bin" / "cera-rs"
    # The dev pins: the same versions `make test` uses (and pip's cache holds).
    constraints = root / "constraints.txt"
    constraints.write_text("\n".join(PROJECT["optional-dependencies"]["dev"]) + "\n")
    pip = (str(py), "-m", "pip", "install", "--quiet", "-c", str(constraints))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    # The user's torch first, then the wheel: pip must leave that torch as it is.
    place_torch(venv)

    def torch_install() -> list[str]:  # version, location and every file, not who needs it
        shown = ok(str(py), "-m", "pip", "show", "--files", "torch", env=env)
        return [line for line in shown.splitlines() if not line.startswith("Required-by:")]

    before = torch_install()
    ok(*pip, str(wheel), env=env, timeout=1200)
    assert torch_install() == before

    # The core package: no matplotlib, and the README quick start runs as written.
    assert sh(str(py), "-c", "import matplotlib", env=env).returncode == 1
    readme = (ROOT / "README.md").read_text()
    quick_start = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    out = ok(str(py), "-c", quick_start, cwd=root, env=env, timeout=300)
    assert "trainable params" in out and "step 2: loss" in out
    assert (root / "cera-adapter" / "adapter_model.safetensors").is_file()
    version = ok(str(cli), "--version", env=env)
    assert version.startswith("cera-rs ") and f"torch {torch.__version__}" in version

    # A CeRA adapter loads through PEFT alone: the wheel's .pth hook registers CeRA
    # when peft is imported, and a process that imports neither gets neither.
    code = (
        "import sys\n"
        "print(sorted(m for m in ('torch', 'peft', 'cera_rs') if m in sys.modules))\n"
        "from peft import PeftConfig\n"
        "config = PeftConfig.from_pretrained('cera-adapter')\n"
        "print(type(config).__name__, config.peft_type.value)"
    )
    assert ok(str(py), "-c", code, cwd=root, env=env).splitlines() == ["[]", "CeraConfig CERA"]

    # Without the demo extra the demo stops at once, naming the line that installs it.
    run = sh(str(cli), "demo", "--quick", "--out", str(root / "demo"), env=env, timeout=120)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and 'pip install "cera_rs[demo]"' in run.stderr
    assert not (root / "demo").exists()

    ok(*pip, f"{wheel}[demo]", env=env, timeout=900)
    # about 1.5 minutes on 2 quiet cores; the limit leaves room for a busy machine
    ok(
        str(cli),
        "demo",
        "--quick",
        "--part",
        "1",
        "--out",
        str(root / "demo"),
        env=env,
        timeout=1500,
    )
    for name in ("summary.json", "report.md", "linear_ceiling.png", "spectra.png"):
        assert (root / "demo" / name).stat().st_size > 0, name
    # part 1's half of the summary (test_examples runs part 2 in the test process)
    summary = json.loads((root / "demo" / "summary.json").read_text())
    families = summary["part1"]["families"]
    assert set(families) == {"linear", "gated", "quadratic"} and "part2" not in summary
    for block in families.values():
        assert len(block["methods"]) == 8
        for row in block["methods"].values():
            assert {"trainable_params", "test_error_mean", "effective_rank", "tail_energy"} <= set(
                row
            )
            assert all(math.isfinite(x) for x in row.values() if isinstance(x, float)), row
