"""Fleet compression: a spawned process pool and a local Ray cluster push every fine-tune into the registry,
report a broken fine-tune without losing the others, and resume by skipping deltas already present."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import fixtures_models as fm
import pytest
import torch

import deltakit
from deltakit.jobs import FleetOptions, compress_fleet
from deltakit.jobs.fleet_spec import load_spec
from deltakit.jobs.fleet_worker import threads_per_worker
from deltakit.registry import Registry

OPTIONS = dict(method="svd", rank=4)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """(base, [two fine-tunes], broken fine-tune): the broken one has a config but a truncated shard."""
    root = tmp_path_factory.mktemp("fleet")
    base, ft1 = fm.make_pair(root, "llama")
    model = fm.build_model("llama", 0)
    fm.perturb_model_(model, 77)
    ft2 = fm.save_model(model, root / "llama-ft2")
    broken = root / "llama-broken"
    shutil.copytree(ft1, broken)
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    return base, [ft1, ft2], broken


def _applied(reg: Registry, base: Path, ref: str) -> dict[str, torch.Tensor]:
    return deltakit.apply(base, reg.resolve_delta(ref), None).state_dict


def test_threads_per_worker_divides_the_cpus():
    assert threads_per_worker(2, cpus=16) == 8
    assert threads_per_worker(3, cpus=16) == 5
    assert threads_per_worker(8, cpus=2) == 1


def test_pool_pushes_good_finetunes_reports_broken_then_resumes(fleet, tmp_path):
    base, good, broken = fleet
    reg = Registry.open(tmp_path / "reg")
    seen: list[tuple[str, int, int]] = []
    options = FleetOptions(**OPTIONS, tag="v1", workers=2)
    report = compress_fleet(base, [*good, broken], reg, options,
                            progress=lambda r, done, total: seen.append((r.ref, done, total)))  # fmt: skip
    by_name = {r.name: r for r in report.results}
    assert not report.ok and report.count("pushed") == 2 and report.count("failed") == 1
    assert by_name["llama-broken"].status == "failed" and by_name["llama-broken"].exit_code != 0
    assert "\n" not in by_name["llama-broken"].error and by_name["llama-broken"].error
    assert sorted(d.ref for d in reg.ls()) == ["llama-ft2:v1", "llama-ft:v1"]
    assert sorted(s[1] for s in seen) == [1, 2, 3] and all(s[2] == 3 for s in seen)
    expected_threads = threads_per_worker(2)
    assert all(r.threads == expected_threads for r in report.results if r.status == "pushed")
    # the pushed deltas are the fine-tunes' own: apply moves the base towards each of them
    for ft, ref in zip(good, ("llama-ft:v1", "llama-ft2:v1"), strict=True):
        rebuilt, target, base_sd = _applied(reg, base, ref), fm.load_state(ft), fm.load_state(base)
        name = "model.layers.0.self_attn.q_proj.weight"
        assert fm.rel_error(rebuilt[name].float(), target[name].float()) < fm.rel_error(
            base_sd[name].float(), target[name].float()
        )
    first = {r.name: r.manifest for r in report.results if r.status == "pushed"}
    again = compress_fleet(base, [*good, broken], reg, options)
    statuses = {r.name: r.status for r in again.results}
    assert statuses == {"llama-ft": "skipped", "llama-ft2": "skipped", "llama-broken": "failed"}
    assert {r.name: r.manifest for r in again.results if r.status == "skipped"} == first


def test_existing_ref_from_another_base_fails_unless_overwrite(fleet, tmp_path):
    base, good, _ = fleet
    reg = Registry.open(tmp_path / "reg")
    other_base = fm.save_model(fm.build_model("llama", 5), tmp_path / "other-base")
    compress_fleet(other_base, good[:1], reg, FleetOptions(**OPTIONS, executor="inline"))
    report = compress_fleet(base, good[:1], reg, FleetOptions(**OPTIONS, executor="inline"))
    assert report.results[0].status == "failed" and "overwrite=True" in report.results[0].error
    report = compress_fleet(base, good[:1], reg, FleetOptions(**OPTIONS, executor="inline", overwrite=True))
    assert report.results[0].status == "pushed"
    assert reg.show_info("llama-ft:latest").base_fingerprint == report.base_fingerprint


def test_cli_spec_json_exit_code_and_summary(fleet, tmp_path, capsys):
    from deltakit_cli.main import main

    base, good, broken = fleet
    spec = tmp_path / "fleet.json"
    spec.write_text(
        json.dumps(
            {
                "base": str(base),
                "method": "svd",
                "rank": 4,
                "tag": "s1",
                "finetunes": [{"name": "team/chat", "path": str(good[0])}, str(broken)],
            }
        )
    )
    args = ["compress-fleet", "--spec", str(spec), "--registry", str(tmp_path / "reg"), "--inline", "--json"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 1
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert data["counts"] == {"pushed": 1, "skipped": 0, "failed": 1}
    assert {r["ref"]: r["status"] for r in data["results"]} == {
        "team/chat:s1": "pushed",
        "llama-broken:s1": "failed",
    }
    assert "1 of 2 fine-tune(s) failed: llama-broken:s1" in out.err and "Traceback" not in out.err
    main(["compress-fleet", "--base", str(base), str(good[0]), "--rank", "4", "-m", "svd", "--tag", "s1",
          "--registry", str(tmp_path / "reg"), "--inline"])  # fmt: skip
    assert "1 pushed, 0 skipped, 0 failed" in capsys.readouterr().out


def test_spec_rejects_unknown_keys_and_duplicate_names(tmp_path):
    from deltakit.errors import FormatError, UsageError

    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"base": "b", "finetunes": ["x"], "ratoi": 0.1}))
    with pytest.raises(FormatError, match="ratoi"):
        load_spec(spec)
    spec.write_text(json.dumps({"base": "b", "finetunes": ["a/x", "b/x"]}))
    with pytest.raises(UsageError, match="distinct names"):
        load_spec(spec)
    spec.write_text(json.dumps({"base": "b", "finetunes": [{"path": "x", "name": "../evil"}]}))
    with pytest.raises(UsageError):
        load_spec(spec)


def test_ray_local_cluster_matches_the_pool(fleet, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    from deltakit_cli.main import main

    base, good, broken = fleet
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        reg_ray = Registry.open(tmp_path / "ray")
        report = compress_fleet(base, [*good, broken], reg_ray, FleetOptions(**OPTIONS, executor="ray"))
        assert ray.is_initialized()  # a cluster started by the caller is left running
        main(["compress-fleet", "--base", str(base), str(good[0]), "-m", "svd", "--rank", "4", "--ray",
              "--registry", str(tmp_path / "cli"), "--json"])  # fmt: skip
        cli = json.loads(capsys.readouterr().out)
        assert cli["executor"] == "ray" and cli["counts"] == {"pushed": 1, "skipped": 0, "failed": 0}
        # another process joins this cluster by address (what --ray-address does on a real cluster)
        address = ray.get_runtime_context().gcs_address
        joined = subprocess.run(
            [sys.executable, "-m", "deltakit_cli.main", "compress-fleet", "--base", str(base), str(good[1]),
             "-m", "svd", "--rank", "4", "--ray-address", address, "--registry", str(tmp_path / "joined"),
             "--json"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert joined.returncode == 0, joined.stderr[-2000:]
        assert json.loads(joined.stdout)["counts"]["pushed"] == 1
    finally:
        ray.shutdown()
    assert {r.name: r.status for r in report.results} == {
        "llama-ft": "pushed", "llama-ft2": "pushed", "llama-broken": "failed"
    }  # fmt: skip
    reg_inline = Registry.open(tmp_path / "inline")
    compress_fleet(base, good, reg_inline, FleetOptions(**OPTIONS, executor="inline"))
    for ref in ("llama-ft:latest", "llama-ft2:latest"):
        a, b = _applied(reg_ray, base, ref), _applied(reg_inline, base, ref)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_yaml_spec_paths_are_relative_to_the_spec(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "models" / "base").mkdir(parents=True)
    spec = tmp_path / "fleet.yaml"
    spec.write_text("base: models/base\nmethod: svd\nratio: 0.125\ntag: v2\nset: {oversample: 4}\n"
                    "finetunes:\n  - ft/chat\n  - {name: code-v2, path: ft/code}\n")  # fmt: skip
    parsed = load_spec(spec)
    assert parsed.base == str(tmp_path / "models" / "base")
    assert [(i.name, i.path) for i in parsed.items] == [
        ("chat", tmp_path / "ft" / "chat"), ("code-v2", tmp_path / "ft" / "code")
    ]  # fmt: skip
    assert parsed.options == {"method": "svd", "ratio": 0.125, "tag": "v2", "overrides": {"oversample": "4"}}
