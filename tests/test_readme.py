"""The README's runnable snippets, as written, on tiny pipeline folders (SD3, Flux): each python block that
starts with a `# run: xdit-fx run --nproc 2 ...` line runs under that command (2 processes) and once in this
process with its plan replaced by `serial`; the saved images must agree, and rank 0's transformer must have received
bytes (the plan ran in parallel, not replicated)."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny_pipelines as tp
from xdit_fx.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
#: 8-bit images: the ranks run the captured graph (and sequence parallel changes summation order, ~1e-7), which
#: can move a pixel across a rounding boundary (measured: 0 levels for sd3 ulysses=2, 1 for flux cfg=2)
PIXEL_ATOL = 2
#: test-only lines after the snippet: rank 0 writes what its transformer received in the last forward
EPILOGUE = """
if pipe.rank == 0:
    import json as _json
    _json.dump(pipe.denoisers["transformer"].last_comm, open("comm.json", "w"))
"""


def runnable_snippets() -> list[tuple[list[str], str]]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    out = []
    for block in blocks:
        first = block.splitlines()[0]
        if first.startswith("# run: xdit-fx run"):
            out.append((shlex.split(first.removeprefix("# run: ")), block))
    return out


def test_readme_has_a_runnable_snippet():
    assert runnable_snippets(), "the README's script block starts with '# run: xdit-fx run --nproc 2 ...'"


@pytest.mark.parametrize("index", range(len(runnable_snippets())))
def test_readme_snippet_runs_on_2_processes_as_on_one(index, tmp_path, monkeypatch):
    command, code = runnable_snippets()[index]
    assert command[:4] == ["xdit-fx", "run", "--nproc", "2"], command
    folders = {"/path/to/pipeline_folder": "sd3", "/path/to/flux_folder": "flux"}
    args = [tp.save_folder(folders[a], tmp_path / "pipelines") if a in folders else a for a in command[5:]]
    script = tmp_path / command[4]
    script.write_text(code + EPILOGUE)

    serial_dir, parallel_dir = tmp_path / "serial", tmp_path / "parallel"
    serial_dir.mkdir(), parallel_dir.mkdir()
    # the reference: the same script in this process, its plan replaced by "serial" (every degree 1)
    serial_code, count = re.subn(r"xdit_fx\.parallelize\(pipe, [^)]*\)", 'xdit_fx.parallelize(pipe, "serial")', code)
    assert count == 1, "the snippet parallelizes its pipeline once"
    (serial_dir / command[4]).write_text(serial_code + EPILOGUE)
    monkeypatch.chdir(serial_dir)
    monkeypatch.setattr(sys, "argv", [command[4], *args])
    runpy.run_path(str(serial_dir / command[4]), run_name="__main__")
    monkeypatch.chdir(parallel_dir)
    assert main(["run", "--nproc", "2", str(script), *args]) == 0

    written = sorted(p.name for p in serial_dir.glob("*.png"))
    assert written and written == sorted(p.name for p in parallel_dir.glob("*.png"))
    for name in written:
        a = np.asarray(Image.open(serial_dir / name), dtype=np.int16)
        b = np.asarray(Image.open(parallel_dir / name), dtype=np.int16)
        diff = int(np.abs(a - b).max())
        print(f"{name}: max pixel difference {diff}")
        assert a.shape == b.shape and diff <= PIXEL_ATOL
    comm = json.loads((parallel_dir / "comm.json").read_text())
    assert sum(sum(ops.values()) for ops in comm.values()) > 0, comm
