"""xdit_fx.load_pipeline: this rank's device, the dtype by name, fp32 modules kept, one-line errors."""

from __future__ import annotations

import pytest
import torch

import tiny_pipelines as tp
from xdit_fx import MissingBackend, PlanError, load_pipeline, local_device
from xdit_fx.loading import resolve_dtype

pytest.importorskip("accelerate")


def test_local_device_follows_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device() == torch.device("cuda", 3)


def test_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32 and resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype(None) is None and resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(PlanError, match="use one of fp32, fp16, bf16 or auto"):
        resolve_dtype("int8")


def test_folder_loads_in_bf16_with_its_fp32_modules_kept(tmp_path):
    folder = tp.save_folder("wan", tmp_path)
    pipe = load_pipeline(folder, dtype="bf16", device="cpu")
    dtypes = {name: p.dtype for name, p in pipe.transformer.named_parameters()}
    kept = type(pipe.transformer)._keep_in_fp32_modules
    assert kept and all((dtypes[n] is torch.float32) == any(k in n for k in kept) for n in dtypes), dtypes
    assert pipe.text_encoder.dtype is torch.bfloat16 and pipe.device == torch.device("cpu")
    assert type(pipe.tokenizer).__name__ == "T5Tokenizer" and pipe.tokenizer("a cat").input_ids


def test_not_a_pipeline_folder_says_what_to_pass(tmp_path):
    folder = tp.save_folder("pixart", tmp_path)
    with pytest.raises(PlanError, match=r"no model_index.json there\) \(that is a component folder; pass its parent\)"):
        load_pipeline(f"{folder}/transformer")


def test_a_missing_library_names_the_extra(tmp_path):
    import json

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline",
                                                         "text_encoder": ["sentencepiece", "Missing"]}))
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed here")
    with pytest.raises(MissingBackend, match=r"needs the 'sentencepiece' package: pip install sentencepiece\."):
        load_pipeline(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline",
                                                         "text_encoder": ["transformers", "T5EncoderModel"]}))
    real = importlib.util.find_spec
    import xdit_fx.loading as loading

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading.importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else real(n, *a))
        with pytest.raises(MissingBackend, match=r"needs the 'transformers' package: pip install 'xdit_fx\[pipelines\]'"):
            load_pipeline(folder)
