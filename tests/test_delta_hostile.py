"""Hostile deltas through the command line: every case is refused with one line and its exit code.

Each case copies a valid dqrelo delta, damages it the way an attacker would (often rewriting the
manifest's sha256 and size so the file check passes), runs ``deltakit apply|verify|inspect|compress``
through the installed entry point, and checks: the exit code, one ``error:`` line on stderr without a
traceback, that nothing appeared or changed outside the output directory, and that the secret file
next to the delta never reaches the output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltakit
from deltakit.format import manifest as manifest_module
from deltakit.format.safetensors_io import file_sha256
from deltakit_cli.main import main

SECRET = "s3cr3t-outside-the-delta"
SHARD = "delta-00001.safetensors"


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_pair) -> dict[str, Path]:
    """A base, a fine-tune with a changed tokenizer_config.json, and a valid delta between them."""
    root = tmp_path_factory.mktemp("hostile")
    base, ft = root / "base", root / "ft"
    shutil.copytree(llama_pair[0], base)
    shutil.copytree(llama_pair[1], ft)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (ft / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    delta = root / "delta"
    # fp16 factors: several cases tamper with the float "up" factor
    deltakit.compress(base, ft, delta, method="dqrelo", ratio=0.25, overrides={"factor_bits": "16"})
    reference = root / "reference"
    deltakit.apply(base, delta, reference)
    return {"root": root, "base": base, "ft": ft, "delta": delta, "reference": reference}


@pytest.fixture
def case(world, tmp_path) -> dict[str, Path]:
    """A private copy of the delta and a secret file next to it (never to be read into an output)."""
    delta = tmp_path / "delta"
    shutil.copytree(world["delta"], delta)
    (tmp_path / "secret.txt").write_text(SECRET)
    return {**world, "tmp": tmp_path, "delta": delta, "out": tmp_path / "out"}


def read_manifest(delta: Path) -> dict:
    return json.loads((delta / "manifest.json").read_text())


def write_manifest(delta: Path, data: dict) -> None:
    (delta / "manifest.json").write_text(json.dumps(data))


def rehash(delta: Path, data: dict | None = None) -> dict:
    """Rewrite the manifest's sha256 and size of every listed file that exists (an attacker's move)."""
    data = data if data is not None else read_manifest(delta)
    for rel in data["files"]:
        path = delta / rel
        if path.is_file():
            data["files"][rel] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    write_manifest(delta, data)
    return data


def encoded_name(data: dict) -> str:
    return next(n for n, e in data["tensors"].items() if e["kind"] == "encoded" and "up" in e["stored"])


def passthrough_name(data: dict) -> str:
    return next(n for n, e in data["tensors"].items() if e["kind"] == "passthrough")


def edit_shard(delta: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(delta / SHARD))
    change(tensors)
    save_file(tensors, str(delta / SHARD), metadata={"format": "deltakit"})
    rehash(delta)


def snapshot(root: Path, skip: Path | None) -> dict[str, tuple[int, str]]:
    """Every file and link under ``root`` (outside ``skip``) with its size and sha256."""
    out = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_symlink():
            out[str(path)] = (-1, os.readlink(path))
        elif path.is_file():
            out[str(path)] = (path.stat().st_size, file_sha256(path))
        else:
            out[str(path)] = (0, "dir")
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> bool:
    """stderr holds exactly one non-empty line, an ``error:`` line, and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err


def watched_state(case) -> tuple:
    """What a command must not change: every file of the case's directory (but the output) and of the
    module's base/fine-tune/delta tree, and the names next to the case's directory (a file planted there
    shows up; other fixtures' live directories, such as a running S3 server's, are not read)."""
    siblings = sorted(p.name for p in case["tmp"].parent.iterdir())
    return snapshot(case["tmp"], case["out"]), snapshot(case["root"], None), siblings


def assert_refused(capsys, case, argv: list, code: int, match: str | None = None) -> str:
    """Run argv; check exit code, one error line, nothing written outside the output, secret unread."""
    before = watched_state(case)
    got, _out, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    if match is not None:
        assert match in lines[0], lines[0]
    assert watched_state(case) == before
    assert not case["out"].exists()
    if os.environ.get("SHOW_REFUSALS"):
        print(f"REFUSAL {code} {lines[0][:150]}", file=sys.__stderr__)
    return lines[0]


def apply_argv(case) -> list:
    return ["apply", case["base"], case["delta"], "-o", case["out"]]


# ---------------------------------------------------------------- manifest mutations (apply -> refused)
def _aux(data, key, value):
    data["aux_files"][key] = value


def _aux_copy(data, path):
    return {"source": "delta", "sha256": "0" * 64, "size": 1, "path": path}


MUTATIONS: dict[str, tuple[Callable[[dict, dict], None], int]] = {
    "aux_key_absolute": (lambda d, c: _aux(d, str(c["tmp"] / "planted.json"), _aux_copy(d, "extra/x")), 3),
    "aux_key_dotdot": (lambda d, c: _aux(d, "../planted.json", _aux_copy(d, "extra/x")), 3),
    "aux_key_slash": (lambda d, c: _aux(d, "sub/config.json", _aux_copy(d, "extra/x")), 3),
    "aux_key_not_allowlisted": (lambda d, c: _aux(d, "run.sh", _aux_copy(d, "extra/x")), 3),
    "aux_key_dotfile": (lambda d, c: _aux(d, ".bashrc", _aux_copy(d, "extra/x")), 3),
    "aux_path_outside": (lambda d, c: _aux(d, "vocab.json", _aux_copy(d, "../secret.txt")), 3),
    "aux_path_absolute": (lambda d, c: _aux(d, "vocab.json", _aux_copy(d, "/etc/hostname")), 3),
    "aux_path_unlisted": (lambda d, c: _aux(d, "vocab.json", _aux_copy(d, "manifest2.json")), 3),
    "shard_dotdot": (lambda d, c: d["tensors"][encoded_name(d)].update(shard="../delta/" + SHARD), 3),
    "shard_absolute": (lambda d, c: d["tensors"][encoded_name(d)].update(shard="/etc/hostname"), 3),
    "files_key_traversal": (
        lambda d, c: d["files"].update({"../secret.txt": {"sha256": "0" * 64, "size": 1}}),
        3,
    ),
    "files_key_absolute": (
        lambda d, c: d["files"].update({"/etc/hostname": {"sha256": "0" * 64, "size": 1}}),
        3,
    ),
    "int8_weight_dtype": (lambda d, c: d["tensors"][encoded_name(d)].update(dtype="int8"), 3),
    "unknown_dtype": (lambda d, c: d["tensors"][encoded_name(d)].update(dtype="qint8"), 3),
    "unknown_codec": (lambda d, c: d["codec"].update(name="no-such-codec"), 2),
    "codec_name_not_string": (lambda d, c: d["codec"].update(name=5), 3),
    "kind_unknown": (lambda d, c: d["tensors"][encoded_name(d)].update(kind="evil"), 3),
    "shape_negative": (lambda d, c: d["tensors"][passthrough_name(d)].update(shape=[-1]), 3),
    "shape_not_list": (lambda d, c: d["tensors"][encoded_name(d)].update(shape="32x32"), 3),
    "passthrough_shape_wrong": (lambda d, c: d["tensors"][passthrough_name(d)].update(shape=[1]), 3),
    "passthrough_dtype_wrong": (lambda d, c: d["tensors"][passthrough_name(d)].update(dtype="float16"), 3),
    "params_scale_string": (lambda d, c: d["tensors"][encoded_name(d)]["params"].update(scale="big"), 3),
    "params_rank_string": (lambda d, c: d["tensors"][encoded_name(d)]["params"].update(rank="8"), 3),
    "params_scale_bool": (lambda d, c: d["tensors"][encoded_name(d)]["params"].update(scale=True), 3),
    "params_shape_wrong": (lambda d, c: d["tensors"][encoded_name(d)]["params"].update(shape=[1, 1]), 3),
    "params_shape_string": (lambda d, c: d["tensors"][encoded_name(d)]["params"].update(shape="[4, 4]"), 3),
    "stored_not_strings": (lambda d, c: d["tensors"][encoded_name(d)].update(stored={"up": 1}), 3),
    "missing_stored_tensor": (lambda d, c: d["tensors"][encoded_name(d)]["stored"].pop("down"), 3),
    "budget_wrong_type": (lambda d, c: d["codec"].update(budget={"ratio": "quarter", "rank": None}), 3),
    "tensors_not_object": (lambda d, c: d.update(tensors=[1, 2]), 3),
    "unchanged_dtype_differs": (
        lambda d, c: d["tensors"].update(
            {
                encoded_name(d): {
                    "kind": "unchanged",
                    "dtype": "float32",
                    "shape": d["tensors"][encoded_name(d)]["shape"],
                }
            }
        ),
        6,
    ),  # fmt: skip
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_hostile_manifest_apply(mutation, case, capsys):
    change, code = MUTATIONS[mutation]
    data = read_manifest(case["delta"])
    change(data, case)
    write_manifest(case["delta"], data)
    assert_refused(capsys, case, apply_argv(case), code)


@pytest.mark.parametrize(
    "mutation",
    ["aux_key_absolute", "aux_key_dotdot", "aux_path_outside", "shard_absolute", "files_key_traversal",
     "int8_weight_dtype", "kind_unknown", "passthrough_shape_wrong", "missing_stored_tensor"],
)  # fmt: skip
def test_hostile_manifest_verify(mutation, case, capsys):
    """``verify`` refuses what ``apply`` refuses (it used to call such deltas ok)."""
    change, code = MUTATIONS[mutation]
    data = read_manifest(case["delta"])
    change(data, case)
    write_manifest(case["delta"], data)
    assert_refused(capsys, case, ["verify", case["delta"]], code)


# ---------------------------------------------------------------- JSON-level attacks
def _raw(case, text: str) -> None:
    (case["delta"] / "manifest.json").write_text(text)


def test_duplicate_json_keys(case, capsys):
    text = (case["delta"] / "manifest.json").read_text()
    _raw(case, text.replace('"codec":', '"codec": {"name": "lossless"}, "codec":', 1))
    assert_refused(capsys, case, apply_argv(case), 3, "duplicate JSON key")


def test_deep_json(case, capsys):
    data = read_manifest(case["delta"])
    text = json.dumps(data)[:-1] + ', "stats": ' + "[" * 5000 + "]" * 5000 + "}"
    _raw(case, text)
    assert_refused(capsys, case, apply_argv(case), 3)


def test_huge_json(case, capsys, monkeypatch):
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 1 << 20)
    data = read_manifest(case["delta"])
    data["stats"]["padding"] = "x" * (2 << 20)
    write_manifest(case["delta"], data)
    assert_refused(capsys, case, apply_argv(case), 3, "larger than a manifest may be")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e999"], ids=["nan", "infinity", "overflow"])
def test_inf_scale_param(case, capsys, literal):
    data = read_manifest(case["delta"])
    data["tensors"][encoded_name(data)]["params"]["scale"] = "@SCALE@"
    _raw(case, json.dumps(data).replace('"@SCALE@"', literal))
    assert_refused(capsys, case, apply_argv(case), 3)


# ---------------------------------------------------------------- shard attacks (sha256 rewritten too)
def test_stored_tensor_wrong_dtype(case, capsys):
    data = read_manifest(case["delta"])
    key = data["tensors"][encoded_name(data)]["stored"]["up"]
    edit_shard(case["delta"], lambda t: t.update({key: t[key].float()}))
    assert_refused(capsys, case, apply_argv(case), 3, "expects float16")


def test_stored_shape_that_broadcasts(case, capsys):
    """up (1, r) instead of (rows, r): up @ down is (1, cols) and would broadcast over the base."""
    data = read_manifest(case["delta"])
    key = data["tensors"][encoded_name(data)]["stored"]["up"]
    edit_shard(case["delta"], lambda t: t.update({key: t[key][:1].clone()}))
    assert_refused(capsys, case, apply_argv(case), 3)


def test_extra_stored_tensor(case, capsys):
    data = read_manifest(case["delta"])
    name = encoded_name(data)
    edit_shard(case["delta"], lambda t: t.update({f"{name}::bonus": torch.zeros(4)}))
    data = read_manifest(case["delta"])
    data["tensors"][name]["stored"]["bonus"] = f"{name}::bonus"
    write_manifest(case["delta"], data)
    assert_refused(capsys, case, apply_argv(case), 3, "expects")


def test_stored_key_absent_from_shard(case, capsys):
    data = read_manifest(case["delta"])
    key = data["tensors"][encoded_name(data)]["stored"]["down"]
    edit_shard(case["delta"], lambda t: t.pop(key))
    assert_refused(capsys, case, apply_argv(case), 3)


def test_nan_in_factors(case, capsys):
    data = read_manifest(case["delta"])
    key = data["tensors"][encoded_name(data)]["stored"]["up"]
    edit_shard(case["delta"], lambda t: t[key].view(-1).__setitem__(0, float("nan")))
    assert_refused(capsys, case, apply_argv(case), 7, "NaN or Inf")


def test_inf_in_passthrough(case, capsys):
    data = read_manifest(case["delta"])
    key = data["tensors"][passthrough_name(data)]["value"]
    edit_shard(case["delta"], lambda t: t[key].view(-1).__setitem__(0, float("inf")))
    assert_refused(capsys, case, apply_argv(case), 7, "NaN or Inf")


def test_nan_in_passthrough(case, capsys):
    data = read_manifest(case["delta"])
    key = data["tensors"][passthrough_name(data)]["value"]
    edit_shard(case["delta"], lambda t: t[key].view(-1).__setitem__(0, float("nan")))
    assert_refused(capsys, case, apply_argv(case), 7)


@pytest.mark.parametrize(
    "damage",
    ["garbage_json", "offsets_past_end", "header_length_huge", "dtype_unknown"],
)
def test_malformed_header_matching_sha(case, capsys, damage):
    shard = case["delta"] / SHARD
    raw = bytearray(shard.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + length].decode()
    if damage == "garbage_json":
        raw[8:12] = b"{{{{"
    elif damage == "offsets_past_end":
        doc = json.loads(header)
        name = next(k for k in doc if k != "__metadata__")
        doc[name]["data_offsets"][1] += 10**9
        text = json.dumps(doc).encode()
        raw = bytearray(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    elif damage == "header_length_huge":
        raw[:8] = (len(raw) * 4).to_bytes(8, "little")
    else:
        raw[8 : 8 + length] = header.replace('"F16"', '"X99"', 1).encode()
    shard.write_bytes(bytes(raw))
    rehash(case["delta"])
    assert_refused(capsys, case, apply_argv(case), 3)


def test_truncated_shard(case, capsys):
    shard = case["delta"] / SHARD
    shard.write_bytes(shard.read_bytes()[:-16])
    assert_refused(capsys, case, apply_argv(case), 4, "truncated")


def test_truncated_shard_rehashed(case, capsys):
    shard = case["delta"] / SHARD
    shard.write_bytes(shard.read_bytes()[:-16])
    rehash(case["delta"])
    assert_refused(capsys, case, apply_argv(case), 3)


# ---------------------------------------------------------------- symlinks
def test_symlinked_shard_to_outside(case, capsys):
    outside = case["tmp"] / "moved.safetensors"
    shutil.move(case["delta"] / SHARD, outside)
    (case["delta"] / SHARD).symlink_to(outside)
    assert_refused(capsys, case, apply_argv(case), 3, "symbolic link")


def test_symlinked_aux_file(case, capsys):
    """extra/tokenizer_config.json replaced by a link to the secret, its sha256 rewritten to match."""
    data = read_manifest(case["delta"])
    rel = data["aux_files"]["tokenizer_config.json"]["path"]
    (case["delta"] / rel).unlink()
    (case["delta"] / rel).symlink_to(case["tmp"] / "secret.txt")
    data["aux_files"]["tokenizer_config.json"]["sha256"] = file_sha256(case["tmp"] / "secret.txt")
    rehash(case["delta"], data)
    assert_refused(capsys, case, apply_argv(case), 3, "symbolic link")
    assert_refused(capsys, case, ["verify", case["delta"]], 3, "symbolic link")


def test_symlinked_delta_dir_component(case, capsys):
    outside = case["tmp"] / "outside-extra"
    shutil.move(case["delta"] / "extra", outside)
    (case["delta"] / "extra").symlink_to(outside)
    assert_refused(capsys, case, apply_argv(case), 3, "symbolic link")


def test_inspect_refuses_symlinked_shard(case, capsys):
    outside = case["tmp"] / "moved.safetensors"
    shutil.move(case["delta"] / SHARD, outside)
    (case["delta"] / SHARD).symlink_to(outside)
    assert_refused(capsys, case, ["inspect", case["delta"]], 3)


# ---------------------------------------------------------------- outputs
def test_output_equals_base_overwrite(case, capsys):
    case["out"] = case["base"]
    got, _, err = run_cli(capsys, "apply", case["base"], case["delta"], "-o", case["base"], "--overwrite")
    assert got == 2 and one_line(err) and "is, contains or lies inside" in err, err
    assert (case["base"] / "config.json").is_file()


def test_output_is_delta_overwrite(case, capsys):
    got, _, err = run_cli(capsys, "apply", case["base"], case["delta"], "-o", case["delta"], "--overwrite")
    assert got == 2 and one_line(err) and "is, contains or lies inside" in err, err
    assert (case["delta"] / "manifest.json").is_file()


def test_output_inside_delta(case, capsys):
    case["out"] = case["delta"] / "rebuilt"
    assert_refused(capsys, case, apply_argv(case), 2, "is, contains or lies inside")


def test_output_contains_base(world, case, capsys, tmp_path):
    """An output that is a parent of the base (with --overwrite) would delete the base: refused."""
    base = tmp_path / "holder" / "base"
    shutil.copytree(world["base"], base)
    case["out"] = tmp_path / "holder"
    got, _, err = run_cli(capsys, "apply", base, case["delta"], "-o", tmp_path / "holder", "--overwrite")
    assert got == 2 and "is, contains or lies inside" in err and one_line(err), err
    assert (base / "config.json").is_file()


def test_compress_output_is_finetune(world, tmp_path, capsys):
    ft = tmp_path / "ft"
    shutil.copytree(world["ft"], ft)
    got, _, err = run_cli(capsys, "compress", "--base", world["base"], ft, "-o", ft, "--overwrite")
    assert got == 2 and "is, contains or lies inside" in err and "Traceback" not in err, err
    assert (ft / "config.json").is_file()


def test_concurrent_writers(case, capsys):
    """A live writer holds the output's lock: a second writer is refused, and the first one succeeds."""
    script = (
        "import sys, time\n"
        "from deltakit.format.atomic import atomic_directory\n"
        "with atomic_directory(sys.argv[1]) as tmp:\n"
        "    (tmp / 'first').write_text('1')\n"
        "    print('holding', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    first = subprocess.Popen(
        [sys.executable, "-c", script, str(case["out"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "holding"
        got, _, err = run_cli(capsys, *apply_argv(case))
        assert got == 2 and "being written by another process" in err and one_line(err), err
    finally:
        first.communicate("\n", timeout=60)
    assert first.returncode == 0
    assert (case["out"] / "first").read_text() == "1"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_interrupted_replace_leftovers_cleaned(case, capsys):
    """Temp dirs of a dead writer are removed; an old output whose replacement never landed returns."""
    pid = _dead_pid()
    out = case["out"]
    stale_tmp = out.parent / f".{out.name}.tmp-{pid}-deadbeef"
    stale_old = out.parent / f".{out.name}.old-{pid}-cafebabe"
    live_tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-0badf00d"
    for d in (stale_tmp, stale_old, live_tmp):
        d.mkdir()
    (stale_old / "marker").write_text("old output")
    (out.parent / f".{out.name}.lock").write_text(str(pid))  # a lock left by the dead writer
    got, _, err = run_cli(capsys, *apply_argv(case), "--overwrite")
    assert got == 0, err
    assert not stale_tmp.exists() and not stale_old.exists()
    assert live_tmp.exists()  # a live process's temp is left alone
    assert not (out.parent / f".{out.name}.lock").exists()
    assert (out / "config.json").is_file() and not (out / "marker").exists()


# ---------------------------------------------------------------- literal printing, unexpected errors
def test_markup_in_file_names(case, capsys, tmp_path):
    delta = tmp_path / "d[/x][red]evil"
    shutil.copytree(case["delta"], delta)
    code, out, err = run_cli(capsys, "verify", delta)
    assert code == 0 and str(delta) in out, err
    code, out, err = run_cli(capsys, "inspect", delta, "--no-tensors")
    assert code == 0 and str(delta) in out, err
    out_dir = tmp_path / "o[bold]ut[/bold]"
    code, out, err = run_cli(capsys, "apply", case["base"], delta, "-o", out_dir)
    assert code == 0 and str(out_dir) in out and (out_dir / "config.json").is_file(), err


def test_markup_in_error_message(case, capsys):
    data = read_manifest(case["delta"])
    data["tensors"]["[/x][red]boom"] = {"kind": "evil", "dtype": "float32", "shape": [1]}
    write_manifest(case["delta"], data)
    line = assert_refused(capsys, case, apply_argv(case), 3)
    assert "[/x][red]boom" in line


def test_markup_in_tensor_names_of_inspect(case, capsys):
    """A tensor named like markup prints literally in the inspect table."""
    data = read_manifest(case["delta"])
    name = passthrough_name(data)
    data["tensors"]["[/]" + name] = data["tensors"].pop(name)
    write_manifest(case["delta"], data)
    code, out, err = run_cli(capsys, "inspect", case["delta"])
    assert code == 0 and "[/]" + name in out, err


def test_unexpected_exception_is_one_line(case, capsys, monkeypatch):
    import deltakit.core.verify as verify_module

    def boom(*args, **kwargs):
        raise ValueError("library [/x] failure\nsecond line")

    monkeypatch.setattr(verify_module, "load_delta", boom)
    code, _, err = run_cli(capsys, "verify", case["delta"])
    assert code == 1 and one_line(err) and "Traceback" not in err, err
    assert "library [/x] failure second line" in err
    monkeypatch.setenv("DELTAKIT_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["verify", str(case["delta"])])


# ---------------------------------------------------------------- compress copies only allowlisted files
def test_compress_copies_only_allowlisted_aux_files(world, tmp_path, capsys):
    ft = tmp_path / "ft"
    shutil.copytree(world["ft"], ft)
    (tmp_path / "secret.txt").write_text(SECRET)
    (ft / ".env").write_text(SECRET)
    (ft / "notes.txt").write_text(SECRET)
    (ft / "vocab.json").symlink_to(tmp_path / "secret.txt")
    delta = tmp_path / "delta"
    code, _, err = run_cli(capsys, "compress", "--base", world["base"], ft, "-o", delta, "--ratio", "1/4")
    assert code == 0, err
    aux = read_manifest(delta)["aux_files"]
    assert set(aux) <= {"config.json", "generation_config.json", "tokenizer_config.json"}
    assert "tokenizer_config.json" in aux
    out = tmp_path / "out"
    assert run_cli(capsys, "apply", world["base"], delta, "-o", out)[0] == 0
    for root in (delta, out):
        names = {p.name for p in root.rglob("*")}
        assert not names & {".env", "notes.txt", "vocab.json"}
        assert all(SECRET not in p.read_text(errors="ignore") for p in root.rglob("*") if p.is_file())


def test_base_index_naming_outside_file(world, case, capsys, tmp_path):
    """A checkpoint index whose weight_map names a file above the base directory is refused."""
    base = tmp_path / "base"
    shutil.copytree(world["base"], base)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../secret.txt"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    case["base"] = base
    assert_refused(capsys, case, apply_argv(case), 3, "unsafe or reserved file path")
