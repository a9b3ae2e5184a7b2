"""lm-evaluation-harness bridge: a local multiple-choice task over a local JSONL file, run on base + delta in
memory, gives the same per-document log-likelihoods and metric as the harness on the merged checkpoint."""

from __future__ import annotations

import json
import math
import shutil

import pytest

pytest.importorskip("lm_eval")

import fixtures_models as fm  # noqa: E402
from fixtures_tokenizer import save_char_tokenizer  # noqa: E402

import deltakit  # noqa: E402

TASK = "deltakit_tiny_mc"
DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"question": "Cats say", "choices": [" woof", " meow", " moo"], "answer": 1},
    {"question": "Ice is", "choices": [" hot", " cold"], "answer": 1},
    {"question": "The sun rises in the", "choices": [" west", " east"], "answer": 1},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base, delta, merged, task_dir): a tiny Llama with a tokenizer, its svd delta, and a local task."""
    root = tmp_path_factory.mktemp("harness")
    base, ft = fm.make_pair(root, "llama")
    save_char_tokenizer(base)
    delta = root / "delta"
    deltakit.compress(base, ft, delta, method="svd", rank=8)
    merged = root / "merged"
    deltakit.apply(base, delta, merged)
    if not (merged / "tokenizer.json").is_file():  # apply copies the base's tokenizer files
        for f in base.glob("*token*"):
            shutil.copyfile(f, merged / f.name)
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: question\n"
        "doc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return base, delta, merged, tasks


def _loglikelihoods(out: dict) -> list[float]:
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return [float(r[0][0]) for s in samples for r in s["resps"]]


def test_bridge_equals_merged_checkpoint(setup):
    import lm_eval

    from deltakit.eval.harness import run_harness

    base, delta, merged, tasks = setup
    bridged = run_harness(base, delta, [TASK], include_path=tasks, log_samples=True)
    manager = lm_eval.tasks.TaskManager(include_path=str(tasks), include_defaults=False)
    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={merged},dtype=float32,device=cpu",
        tasks=[TASK],
        task_manager=manager,
        log_samples=True,
    )
    acc = bridged["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0 and acc == reference["results"][TASK]["acc,none"]
    got, want = _loglikelihoods(bridged), _loglikelihoods(reference)
    assert len(got) == sum(len(d["choices"]) for d in DOCS)
    assert all(math.isfinite(x) for x in got)
    assert got == pytest.approx(want, abs=1e-4)
    # the delta matters: the base alone scores the same choices differently
    alone = _loglikelihoods(run_harness(base, None, [TASK], include_path=tasks, log_samples=True))
    assert max(abs(a - b) for a, b in zip(alone, got, strict=True)) > 1e-3


def test_registered_model_type_through_simple_evaluate(setup):
    import lm_eval

    import deltakit.eval.harness  # noqa: F401  registers model="deltakit"

    base, delta, _, tasks = setup
    out = lm_eval.simple_evaluate(
        model="deltakit",
        model_args=f"base={base},delta={delta}",
        tasks=[TASK],
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks), include_defaults=False),
        limit=2,
    )
    assert out["results"][TASK]["acc,none"] in (0.0, 0.5, 1.0)


def test_cli_eval_harness_json_and_errors(setup, capsys):
    from deltakit_cli.main import main

    base, delta, _, tasks = setup
    main(["eval-harness", "--base", str(base), str(delta), "--tasks", TASK, "--include-path", str(tasks),
          "--json"])  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["results"][0]["delta"] == str(delta)
    assert 0.0 <= data["results"][0]["tasks"][TASK]["acc,none"] <= 1.0
    with pytest.raises(SystemExit) as exc:
        main(["eval-harness", "--base", str(base), str(delta), "--tasks", "no_such_task",
              "--include-path", str(tasks)])  # fmt: skip
    assert exc.value.code == 2
    assert "unknown harness task(s) no_such_task" in capsys.readouterr().err


def test_harness_own_command_line_with_deltakit_model(setup):
    import subprocess
    import sys

    base, delta, _, tasks = setup
    proc = subprocess.run(
        [sys.executable, "-m", "deltakit.eval.harness_cli", "run", "--model", "deltakit",
         "--model_args", f"base={base},delta={delta}", "--tasks", TASK, "--include_path", str(tasks),
         "--device", "cpu", "--limit", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TASK in proc.stdout and "acc" in proc.stdout
