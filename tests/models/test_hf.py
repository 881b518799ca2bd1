"""Hugging Face models by name (xsurgery/_hf.py): built offline from configs, one-line errors."""

import pytest
import torch

from xsurgery.cli import main
from xsurgery.errors import UserError
from xsurgery.models import hf as _hf
from xsurgery.models.hf import create_hf_model

TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
             "vocab_size": 50}


def test_builds_from_config_eager_no_cache():
    model = create_hf_model("bert", TINY_BERT)
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config.num_hidden_layers == 1 and model.config._attn_implementation == "eager"
    # any model_type, through AutoModel
    roberta = create_hf_model("roberta", {**TINY_BERT, "max_position_embeddings": 40})
    assert type(roberta).__name__ == "RobertaModel"
    gpt2 = create_hf_model("gpt2", {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 50})
    out = gpt2(torch.randint(0, 50, (1, 5)))
    assert out.logits.shape == (1, 5, 50) and out.past_key_values is None  # use_cache off: plain tensors


def test_llama_default_is_made_small(capsys):
    model = create_hf_model("llama", {"num_hidden_layers": 1, "vocab_size": 64})
    assert model.config.hidden_size == 512 and model.config.num_hidden_layers == 1
    assert "full-size" in capsys.readouterr().err


@pytest.mark.parametrize("name, kwargs, pretrained, match", [
    ("bert", {}, True, "does not download from the Hugging Face hub"),
    ("bertt", {}, False, "did you mean hf/bert"),
    ("zzzz", {}, False, "short names: hf/bert"),
    ("bert", {"hidden_sizes": 3}, False, "BertConfig has no field"),
    ("bert", {**TINY_BERT, "hidden_size": 33}, False, "rejected --model-kwargs"),
])
def test_errors_are_one_line(name, kwargs, pretrained, match):
    with pytest.raises(UserError, match=match) as err:
        create_hf_model(name, kwargs, pretrained)
    assert "\n" not in str(err.value)


def test_too_large_for_memory_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(_hf, "_memory_bytes", lambda: 10_000)  # tiny bert's ~0.03 M parameters do not fit in 10 kB
    with pytest.raises(UserError, match=r"hf/bert: these --model-kwargs build 0\.0\d M parameters.*--model-kwargs"):
        create_hf_model("bert", TINY_BERT)


def test_cli_hf_convert(capsys):
    import json

    assert main(["convert", "hf/bert", "--model-kwargs", json.dumps(TINY_BERT), "--compress", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data["inputs"]] == ["input_ids", "attention_mask"]
    assert data["inputs"][0]["dtype"] == "int64" and data["totals"]["converted_layers"] > 0
    assert main(["convert", "hf/bert", "--pretrained"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --pretrained" in err[0]
