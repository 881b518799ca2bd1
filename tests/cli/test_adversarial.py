"""Issue 23, files and inputs: what a hostile file or command line gets.

Every case runs the CLI in a subprocess with a timeout (a hang fails, not blocks) and
asserts: exit 2, exactly one stderr line ``xsurgery: error: ...``, no traceback, no control
character on the terminal, nothing created or destroyed in the folder, and no network use
(a ``sitecustomize`` writes a marker file on any DNS look-up or socket connect).
"""

from __future__ import annotations

import json
import os
import stat
import struct
import sys

import pytest
import torch

import xsurgery

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 60
BOMB = "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9 if p else ['x'] * 9)}]\n"
               for p, c in zip(["", *"abcdefgh"], "abcdefghi"))

_SITE = '''
import os, socket
_marker = os.environ["XS_NET_MARKER"]
def _touch(*a, **k):
    open(_marker, "a").close()
    raise OSError("network disabled by the test")
socket.getaddrinfo = _touch
socket.create_connection = _touch
socket.socket.connect = _touch
socket.socket.connect_ex = _touch
'''


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """``cli(*args, cwd=folder, subprocess=False)`` -> (exit code, stderr text). In-process by
    default (fast); ``subprocess=True`` for the cases that could hang, with a timeout. Either
    way a DNS look-up or socket connect writes a marker file, which must never appear."""
    import socket

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITE)
    marker = tmp_path / "network-used"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), ROOT]), "XS_NET_MARKER": str(marker),
           "OMP_NUM_THREADS": "1", "COLUMNS": "120", "TORCH_HOME": str(tmp_path / "torch-home")}

    def touch(*a, **k):
        marker.touch()
        raise OSError("network disabled by the test")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, touch)
    monkeypatch.setattr(socket.socket, "connect", touch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def run(*args, cwd, subprocess=False):
        if subprocess:
            import subprocess as sp

            res = sp.run([sys.executable, "-m", "xsurgery.cli", *args], cwd=cwd, env=env, capture_output=True,
                         timeout=TIMEOUT)
            return res.returncode, res.stderr.decode("utf-8", "replace")
        from xsurgery.cli import main

        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code
        return code, capsys.readouterr().err

    yield run
    assert not marker.exists(), "the command reached for the network"


def _listing(folder):
    return sorted((p, os.lstat(os.path.join(folder, p)).st_mtime_ns) for p in os.listdir(folder))


def refused(cli, folder, *args, match=None, subprocess=False):
    """Run ``args`` in ``folder``: one error line, exit 2, the folder unchanged."""
    before = _listing(folder)
    code, err = cli(*args, cwd=folder, subprocess=subprocess)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("xsurgery: error: "), err[-2000:]
    assert "\x1b" not in err and "\r" not in err
    if match:
        assert match in lines[0], lines[0]
    assert _listing(folder) == before, "files were created, changed or removed"
    return lines[0]


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model, _ = xsurgery.convert("digits_cnn", compress=2, check=False)
    path = folder / "d.xs"
    xsurgery.save(model, str(path))
    return str(path)


def _read(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def _write(path, header_text: str, data: bytes):
    raw = header_text.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def tampered(src, dst, *, manifest=None, header=None, tensors=None):
    """A copy of checkpoint ``src`` with its manifest, header text or tensors changed; with
    ``tensors``, the digests are recomputed as a forger would."""
    from safetensors.torch import load_file, save

    from xsurgery.checkpoint._manifest import weights_digest

    head, data = _read(src)
    m = json.loads(head["__metadata__"]["xsurgery"])
    if tensors is not None:
        ts = load_file(src)
        tensors(ts, m)
        m["weights"] = weights_digest(ts)
        blob = save(ts, metadata={"xsurgery": json.dumps(m)})
        with open(dst, "wb") as f:
            f.write(blob)
        return str(dst)
    if manifest is not None:
        manifest(m)
    head["__metadata__"]["xsurgery"] = json.dumps(m)
    text = json.dumps(head)
    if header is not None:
        text = header(text)
    _write(dst, text, data)
    return str(dst)


def test_huge_hf_config_in_a_checkpoint_is_refused_before_building(cli, ckpt, tmp_path):
    def hf(m):
        m["source"] = {"source": "hf/bert", "model_kwargs": {"num_hidden_layers": 10_000_000}, "pretrained": False}
    path = tampered(ckpt, tmp_path / "bert.xs", manifest=hf)
    refused(cli, tmp_path, "report", path, match="num_hidden_layers must be in 1..1024", subprocess=True)


@pytest.mark.parametrize("kwargs", [{"weights": "IMAGENET1K_V1"}, {"weights_backbone": "DEFAULT"},
                                    {"pretrained": True}, {"checkpoint_path": "/etc/passwd"}])
def test_manifest_kwargs_never_choose_weights(cli, ckpt, tmp_path, kwargs):
    def src(m):
        m["source"] = {"source": "resnet18", "model_kwargs": kwargs, "pretrained": False}
    path = tampered(ckpt, tmp_path / "w.xs", manifest=src)
    refused(cli, tmp_path, "report", path, match="never downloads")


def test_control_characters_in_a_layer_name_are_escaped(cli, ckpt, tmp_path):
    def evil(m):
        m["layers"][0]["name"] = "features.4\nxsurgery: all good\x1b[2J\r"
    path = tampered(ckpt, tmp_path / "evil.xs", manifest=evil)
    line = refused(cli, tmp_path, "report", path)
    assert "\\n" in line and "\\x1b" in line


@pytest.mark.parametrize("bad", ['"NaN"', "NaN", "null", '"12"', "-5", "1" * 5000, "[1, 2]"])
def test_bad_numbers_in_the_safetensors_header(cli, ckpt, tmp_path, bad):
    def offsets(text):
        head = json.loads(text)
        name = next(k for k in head if k != "__metadata__")
        head[name]["data_offsets"] = ["@@", head[name]["data_offsets"][1]]
        return json.dumps(head).replace('"@@"', bad)
    path = tampered(ckpt, tmp_path / "h.xs", header=offsets)
    refused(cli, tmp_path, "report", path)


@pytest.mark.parametrize("key,value", [("degree", "1" * 5000), ("degree", "NaN"), ("degree", "Infinity"),
                                       ("degree", '"x"'), ("degree", "-3"), ("name", "null"), ("name", "7")])
def test_bad_values_in_the_manifest(cli, ckpt, tmp_path, key, value):
    def bad(m):
        m["layers"][0][key] = "@@"
    path = tampered(ckpt, tmp_path / "m.xs", manifest=bad)
    head, data = _read(path)
    text = json.dumps(head).replace('\\"@@\\"', value)
    _write(path, text, data)
    refused(cli, tmp_path, "report", path)


@pytest.mark.parametrize("how,match", [("range", "outside"), ("negative", "outside"), ("repeat", "repeats an input"),
                                       ("degree", "records degree")])
def test_index_buffers_are_checked_whatever_the_digests_say(cli, ckpt, tmp_path, how, match):
    from xsurgery.graphs import BipartiteGraph

    sizes = {n: (m.in_features, m.out_features) for n, m in xsurgery.load(ckpt).named_modules()
             if hasattr(m, "graph")}

    def forge(ts, m):
        layer = m["layers"][0]
        key = layer["name"] + ".index"
        idx = ts[key].clone()
        if how == "range":
            idx[0] = 10_000
        elif how == "negative":
            idx[0] = -1
        elif how == "repeat":
            idx[1] = idx[0]
        else:
            layer["degree"] += 1
        ts[key] = idx
        if how != "degree":  # the forger recomputes the graph hash too
            cin, cout = sizes[layer["name"]]
            g = layer["blocks"]
            layer["index_hash"] = BipartiteGraph(cin, cout, idx.numel() // g, g, idx.view(g, -1), layer["graph"],
                                                 None).hash()
    path = tampered(ckpt, tmp_path / "i.xs", tensors=forge)
    refused(cli, tmp_path, "report", path, match=match)


# ----------------------------------------------------------------------------- YAML and plans


def test_yaml_alias_bomb_in_a_plan(cli, tmp_path):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    refused(cli, tmp_path, "convert", "digits_cnn", "--plan", "bomb.yaml", "-o", "out.xs", match="alias",
            subprocess=True)


def test_yaml_alias_bomb_in_a_recipe(cli, tmp_path):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    refused(cli, tmp_path, "train", "bomb.yaml", match="alias", subprocess=True)


@pytest.mark.parametrize("override", ["epochs=" + "9" * 5000, "optim.lr=.nan", "seed=" + str(2**70),
                                      "optim.lr=[1, 2]"])
def test_bad_numbers_in_a_recipe(cli, tmp_path, override):
    refused(cli, tmp_path, "train", os.path.join(ROOT, "recipes", "digits.yaml"), f"output={tmp_path / 'run'}",
            override)


def test_plan_naming_a_fifo_is_refused_not_read(cli, tmp_path):
    os.mkfifo(tmp_path / "plan.yaml")
    refused(cli, tmp_path, "plan", "digits_cnn", "--plan", "plan.yaml", match="not a regular file", subprocess=True)


def test_plan_with_a_nested_bomb_value(cli, tmp_path):
    (tmp_path / "plan.yaml").write_text("- {pattern: 'features.*', compress: " + "[" * 20000 + "]" * 20000 + "}\n")
    refused(cli, tmp_path, "plan", "digits_cnn", "--plan", "plan.yaml", match="nested deeper", subprocess=True)


# ----------------------------------------------------------------------------- outputs


def test_device_output_is_refused_even_with_force(cli, tmp_path):
    refused(cli, tmp_path, "convert", "digits_cnn", "-o", "/dev/null", match="exists")
    refused(cli, tmp_path, "convert", "digits_cnn", "-o", "/dev/null", "--force", match="not a regular file",
            subprocess=True)
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_fifo_output_is_refused_even_with_force(cli, tmp_path):
    os.mkfifo(tmp_path / "out.xs")
    refused(cli, tmp_path, "convert", "digits_cnn", "-o", "out.xs", "--force", match="not a regular file")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "out.xs").st_mode)


def test_non_utf8_output_name_is_refused(cli, tmp_path):
    refused(cli, tmp_path, "convert", "digits_cnn", "-o", os.fsdecode(b"\xff\xfe.xs"), match="not valid UTF-8",
            subprocess=True)


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("args,match", [
    (["--seed", str(2**70)], "--seed"),
    (["--model-kwargs", '{"a": ' + "[" * 30000 + "]" * 30000 + "}"], "--model-kwargs"),
    (["--model-kwargs", '{"a": ' + "[" * 50000 + "]" * 50000 + "}"], "--model-kwargs"),
    (["--model-kwargs", '{"a": ' + "1" * 5000 + "}"], "--model-kwargs"),
])
def test_command_line_bounds(cli, tmp_path, args, match):
    refused(cli, tmp_path, "plan", "digits_cnn", *args, match=match)


@pytest.mark.parametrize("threads", ["3000000000", "-5", "0"])
def test_threads_are_bounded(cli, tmp_path, threads):
    refused(cli, tmp_path, "bench", "digits_cnn", "--compress", "2", "--threads", threads, match="--threads")


@pytest.mark.parametrize("kwargs,match", [
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_hidden_layers": "2"}, "must be an integer"),
    ({"num_hidden_layers": 10_000_000}, "num_hidden_layers"),
    ({"hidden_act": "nosuch", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
      "intermediate_size": 64}, "rejected"),
])
def test_hf_config_values(cli, tmp_path, kwargs, match):
    refused(cli, tmp_path, "plan", "hf/bert", "--model-kwargs", json.dumps(kwargs), match=match)
