"""The xdit-fx command line: the pass list for a plan, and clean errors for bad plans."""

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
