"""The xdit-fx command line: the pass list for a plan, and clean errors for bad plans."""

import os

import pytest

from xdit_fx.cli import main


def test_passes_lists_the_pipeline_in_order(capsys):
    assert main(["passes", "--plan", "ulysses=2,ring=2"]) == 0
    out = capsys.readouterr().out
    names = ["normalize_attention", "find_attention", "find_transformer_blocks", "infer_token_dims", "shard_sequence",
             "parallelize_attention"]
    positions = [out.index(f". {n} [") for n in names]
    assert positions == sorted(positions)
    assert "world size 4" in out


def test_bad_plan_is_a_one_line_error_not_a_traceback(capsys):
    assert main(["passes", "--plan", "pipefusion=2,cache=fbc:0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xdit-fx passes: error:") and "PipeFusion without cache" in err and "Traceback" not in err
    assert main(["passes", "--plan", "ulysses=x"]) == 2
    assert "a degree must be an integer" in capsys.readouterr().err


def test_run_gives_each_rank_one_thread_and_a_failed_rank_one_line(tmp_path, capfd):
    """`xdit-fx run` like torchrun: OMP_NUM_THREADS=1 per rank unless set; a rank that raises stops the job,
    its own traceback shows once, and one line names it (exit code 1)."""
    script = tmp_path / "script.py"
    script.write_text(
        "import os, sys, torch\n"
        "rank = int(os.environ['RANK'])\n"
        "open(os.path.join(sys.argv[1], f'threads{rank}'), 'w').write(str(torch.get_num_threads()))\n"
        "if rank == 1:\n"
        "    import time\n"  # rank 0 has written its count before rank 1 fails (and the job stops rank 0)
        "    deadline = time.time() + 120\n"
        "    t0 = os.path.join(sys.argv[1], 'threads0')\n"
        "    while not (os.path.exists(t0) and os.path.getsize(t0)) and time.time() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    raise ValueError('a mistake on rank 1')\n")
    assert main(["run", "--nproc", "2", str(script), str(tmp_path)]) == 1
    err = capfd.readouterr().err
    assert [(tmp_path / f"threads{r}").read_text() for r in range(2)] == ["1", "1"]
    assert err.count("ValueError: a mistake on rank 1") == 1, err
    assert "xdit-fx run: error: rank 1 of 2 exited with code 1" in err and "ChildFailedError" not in err, err


def _rank_environment(names: list[str]) -> dict:
    import torch

    return {**{name: os.environ.get(name) for name in names}, "threads": torch.get_num_threads()}


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_launched_ranks_see_the_environment_as_it_is_at_the_launch(method, monkeypatch):
    """Both start methods give each rank the launching process's environment at the launch (a forked rank
    would otherwise keep the fork server's, from when it started), the launcher's rank variables and one
    thread; an unknown start method is refused by name."""
    from xdit_fx.runtime.launch import launch

    monkeypatch.setenv("XDIT_FX_START_METHOD", method)
    launch(_rank_environment, 1, ([],))  # the fork server (when forked) starts before the variable below exists
    monkeypatch.setenv("XDIT_FX_TEST_MARK", f"set after the first launch ({method})")
    names = ["XDIT_FX_TEST_MARK", "RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS"]
    seen = launch(_rank_environment, 2, (names,))
    assert seen == {r: {"XDIT_FX_TEST_MARK": f"set after the first launch ({method})", "RANK": str(r),
                        "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                        "threads": 1} for r in range(2)}, seen
    monkeypatch.setenv("XDIT_FX_START_METHOD", "fork")
    with pytest.raises(ValueError, match="XDIT_FX_START_METHOD='fork': use 'spawn'"):
        launch(_rank_environment, 2, (names,))
