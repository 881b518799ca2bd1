"""Hugging Face folders: save(format="hf") / load(folder) / xsurgery.hf.from_pretrained, and a
config's xsurgery section refused when tampered (one line, nothing it names runs)."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import xsurgery
from xsurgery.cli import main
from xsurgery.errors import UserError
from xsurgery.layers import X_LAYERS

BERT = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
        "vocab_size": 120, "max_position_embeddings": 64}
GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 120, "n_positions": 64, "bos_token_id": 0,
        "eos_token_id": 0}
VIT = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
       "image_size": 32, "patch_size": 8}
MODELS = {"bert": BERT, "gpt2": GPT2, "vit": VIT}


def _inputs(name):
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(1, 120, (2, 12), generator=g), "attention_mask": torch.ones(2, 12, dtype=torch.long)}


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    return {n: xsurgery.convert(f"hf/{n}", compress=2, model_kwargs=kw)[0] for n, kw in MODELS.items()}


@pytest.fixture(scope="module")
def gpt2_folder(converted, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("hf") / "gpt2-x2")
    xsurgery.save(converted["gpt2"], folder, format="hf")
    return folder


def _outputs(model, name):
    with torch.no_grad():
        out = model(**_inputs(name))
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_bit_exact(converted, name, tmp_path):
    model = converted[name]
    folder = str(tmp_path / name)
    manifest = xsurgery.save(model, folder, format="hf")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]  # built from a config: no tokenizer
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["architectures"] == [type(model).__name__] and config["model_type"] == name
    assert config["xsurgery"]["layers"] == manifest["layers"] and len(manifest["layers"]) > 0
    # transformers reads the folder's config as its own
    import transformers

    assert type(transformers.AutoConfig.from_pretrained(folder)) is type(model.config)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(model.state_dict())
    loaded = xsurgery.load(folder)
    assert type(loaded) is type(model) and not loaded.training
    assert sum(isinstance(m, X_LAYERS) for m in loaded.modules()) == len(manifest["layers"])
    ref, got = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    before, after = _outputs(model.eval(), name), _outputs(loaded, name)
    assert len(before) == len(after) > 0 and all(torch.equal(a, b) for a, b in zip(before, after))
    # a dense model of random weights gives other outputs: the comparison can fail
    dense = xsurgery.load(folder)
    torch.nn.init.normal_(next(p for n, p in dense.named_parameters() if "weight" in n and p.dim() == 2))
    assert not all(torch.equal(a, b) for a, b in zip(before, _outputs(dense, name)))


def test_gpt2_generate_same_tokens(converted, gpt2_folder):
    model = converted["gpt2"].eval()
    loaded = xsurgery.hf.from_pretrained(gpt2_folder)
    prompt = torch.tensor([[5, 17, 42, 8]])
    a = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    b = loaded.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert a.shape == (1, 14) and torch.equal(a, b)
    # greedy decoding by hand: argmax of the last logits, step by step
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, loaded(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, b)


def test_overwrite_needs_force_and_only_our_folders(converted, gpt2_folder, tmp_path):
    with pytest.raises(UserError, match="exists; pass --force"):
        xsurgery.save(converted["gpt2"], gpt2_folder, format="hf")
    folder = str(tmp_path / "again")
    xsurgery.save(converted["bert"], folder, format="hf")
    xsurgery.save(converted["gpt2"], folder, format="hf", force=True)
    assert type(xsurgery.load(folder)).__name__ == "GPT2LMHeadModel"
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".tmp-")]  # no temp folder left
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="did not write"):
        xsurgery.save(converted["gpt2"], str(other), format="hf", force=True)
    assert (other / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    xsurgery.save(converted["gpt2"], str(empty), format="hf")  # an empty folder is filled, nothing overwritten
    assert sorted(os.listdir(empty)) == ["config.json", "model.safetensors"]
    with pytest.raises(UserError, match="not a folder"):
        xsurgery.save(converted["gpt2"], str(other / "notes.txt"), format="hf", force=True)


def test_only_transformers_models(tmp_path):
    model, _ = xsurgery.convert(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
                                compress=2, include_stem=True, example_inputs=torch.randn(1, 8))
    with pytest.raises(UserError, match="not one: save it as an .xs file"):
        xsurgery.save(model, str(tmp_path / "seq"), format="hf")
    assert not os.path.exists(tmp_path / "seq")
    with pytest.raises(UserError, match="unknown save format"):
        xsurgery.save(model, str(tmp_path / "seq"), format="onnx")


def _tampered(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    config = json.load(open(path))
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)
    return dst


def _set(*keys, value):
    def edit(config):
        d = config
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


TAMPER = {
    "unknown key": (_set("xsurgery", "run", value="os.system('x')"), "unknown key(s) run"),
    "unknown layer key": (lambda c: c["xsurgery"]["layers"][0].update(code="x"), "unknown key(s) code"),
    "wrong type": (_set("xsurgery", "layers", value={"a": 1}), "layers must be a list"),
    "degree as text": (lambda c: c["xsurgery"]["layers"][0].update(degree="16"), "degree and blocks"),
    "index hash": (lambda c: c["xsurgery"]["layers"][0].update(index_hash="0" * 16), "do not match the manifest"),
    "import path source": (_set("xsurgery", "source", "source", value="os:system"), "not a library model name"),
    "file source": (_set("xsurgery", "source", "source", value="/etc/passwd"), "not a library model name"),
    "plan file": (_set("xsurgery", "surgery", "plan", value="/etc/passwd"), "names a file"),
    "architecture": (_set("architectures", value=["os.system"]), "is not one transformers class"),
    "class of another type": (_set("architectures", value=["BertModel"]), "is not one transformers class"),
    "model type": (_set("model_type", value="evil"), "not a transformers model type"),
    "attention kernel": (_set("xsurgery", "hf", "attn_implementation", value="kernels-community/flash-attn"),
                         "not one of eager, sdpa"),
    "config field type": (_set("n_layer", value="2"), "must be an integer"),
    "huge layer count": (_set("n_layer", value=10**6), "must be in"),
    "digest": (lambda c: c["xsurgery"]["weights"]["tensors"]["transformer.wte.weight"].update(sha256="0" * 64),
               "does not match its sha256"),
    "no section": (lambda c: c.pop("xsurgery"), "has no xsurgery section"),
    "format": (_set("xsurgery", "format_version", value=99), "unsupported xsurgery section format"),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_section_refused_in_one_line(gpt2_folder, tmp_path, case):
    edit, match = TAMPER[case]
    folder = _tampered(gpt2_folder, str(tmp_path / "t"), edit)
    with pytest.raises(UserError) as info:
        xsurgery.hf.from_pretrained(folder)
    msg = str(info.value)
    assert "\n" not in msg and match in msg, msg


def test_bit_flip_in_weights_refused(gpt2_folder, tmp_path):
    import shutil

    folder = str(tmp_path / "flip")
    shutil.copytree(gpt2_folder, folder)
    path = os.path.join(folder, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x40
    open(path, "wb").write(bytes(data))
    with pytest.raises(UserError, match="does not match its sha256"):
        xsurgery.load(folder)


def test_tokenizer_saved_and_carried_along(converted, tmp_path):
    import transformers

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    tok = transformers.BertTokenizer(str(vocab))
    folder = str(tmp_path / "bert")
    xsurgery.save(converted["bert"], folder, format="hf", tokenizer=tok)
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(os.listdir(folder))
    back = transformers.AutoTokenizer.from_pretrained(folder)
    assert back("hello world")["input_ids"] == tok("hello world")["input_ids"] == [2, 5, 6, 3]
    # a model loaded from the folder, converted again or not, takes its tokenizer files along
    again = str(tmp_path / "again")
    xsurgery.hf.save_pretrained(xsurgery.hf.from_pretrained(folder), again)
    assert transformers.AutoTokenizer.from_pretrained(again)("hello world")["input_ids"] == [2, 5, 6, 3]
    with pytest.raises(UserError, match="must be a transformers tokenizer"):
        xsurgery.save(converted["bert"], str(tmp_path / "bad"), format="hf", tokenizer="bert-base-uncased")
    with pytest.raises(UserError, match="format='hf'"):
        xsurgery.save(converted["bert"], str(tmp_path / "x.xs"), tokenizer=tok)


def test_cli_convert_to_folder_then_report_and_load(tmp_path, capsys):
    folder = str(tmp_path / "bert-x2")
    argv = ["convert", "hf/bert", "--compress", "2", "--model-kwargs", json.dumps(BERT), "-o", folder,
            "--format", "hf", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "params" in out
    assert main(["report", folder, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    converted_layers = [r for r in rep["layers"] if r.get("converted")]
    assert len(converted_layers) == len(json.load(open(os.path.join(folder, "config.json")))["xsurgery"]["layers"]) > 0
    loaded = xsurgery.load(folder)
    assert type(loaded).__name__ == "BertModel"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass --force" in err
    assert main(argv + ["--force"]) == 0
    capsys.readouterr()
    assert main(["convert", "hf/bert", "--model-kwargs", json.dumps(BERT), "-o", str(tmp_path / "f") + "/"]) == 2
    assert "add --format hf" in capsys.readouterr().err
    assert main(["convert", "hf/bert", "--model-kwargs", json.dumps(BERT), "--format", "hf"]) == 2
    assert "-o FOLDER" in capsys.readouterr().err


def test_half_precision_reloads_in_its_dtype(converted, tmp_path):
    import copy

    model = copy.deepcopy(converted["gpt2"]).to(torch.bfloat16).eval()
    folder = str(tmp_path / "bf16")
    xsurgery.save(model, folder, format="hf")
    loaded = xsurgery.load(folder)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[3, 9, 27]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_transformers_from_pretrained_model_keeps_its_tokenizer(tmp_path):
    """The user's flow: a local folder loaded with transformers, converted, saved as a folder."""
    import transformers

    src = tmp_path / "bert-local"
    config = transformers.BertConfig(**BERT)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(src))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "sparse", "net"]) + "\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(str(src))
    dense = transformers.BertModel.from_pretrained(str(src)).eval()
    model, _ = xsurgery.convert(dense, compress=2)
    folder = str(tmp_path / "bert-x2")
    xsurgery.save(model, folder, format="hf")
    assert "tokenizer_config.json" in os.listdir(folder)
    assert transformers.AutoTokenizer.from_pretrained(folder)("sparse net")["input_ids"] == [2, 5, 6, 3]
    loaded = xsurgery.hf.from_pretrained(folder)  # a model converted from an object: built from config.json
    assert json.load(open(os.path.join(folder, "config.json")))["xsurgery"]["source"]["source"] == "object"
    before, after = _outputs(model.eval(), "bert"), _outputs(loaded, "bert")
    assert all(torch.equal(a, b) for a, b in zip(before, after))
