"""Bad input: one clear error naming file, line or key, and nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dice_core.config import load_recipe, parse_recipe
from dice_core.data import load_pairs, load_prompts
from dice_core.errors import DataError, RecipeError, StoreError
from dice_core.models import resolve_model
from dice_core.store import ArtifactStore

ROOT = Path(__file__).resolve().parent.parent


def dice(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=300,
    )


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_missing_field_names_file_and_line(tmp_path):
    bad = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a"}', '{"prompt": "b"}', '{"text": "c"}'])
    with pytest.raises(DataError, match=r"p\.jsonl: line 3: missing field `prompt`"):
        load_prompts(str(bad))


def test_invalid_json_names_the_line(tmp_path):
    bad = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a"}', '{"prompt": "b",'])
    with pytest.raises(DataError, match=r"line 2: invalid JSON"):
        load_prompts(str(bad))


def test_wrong_type_and_blank_prompt(tmp_path):
    with pytest.raises(DataError, match=r"line 1: field `prompt` must be str, got int"):
        load_prompts(str(write_lines(tmp_path / "a.jsonl", ['{"prompt": 3}'])))
    blank = write_lines(tmp_path / "b.jsonl", ['{"prompt": "x"}', "", '{"prompt": " "}'])
    with pytest.raises(DataError, match=r"line 3: field `prompt` is empty"):
        load_prompts(str(blank))
    with pytest.raises(DataError, match=r"line 1: missing field `rejected`"):
        load_pairs(str(write_lines(tmp_path / "c.jsonl", ['{"prompt": "x", "chosen": "y"}'])))


def test_bytes_that_are_not_utf8(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"prompt": "a"}\n\xff\xfe{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"line 2: not UTF-8 text"):
        load_prompts(str(bad))


def test_empty_prompt_set(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_prompts(str(empty))


def test_k_below_two_and_gamma_bounds():
    with pytest.raises(RecipeError, match=r"generation\.samples_per_prompt: must be at least 2"):
        parse_recipe({"generation": {"samples_per_prompt": 1}})
    with pytest.raises(
        RecipeError, match=r"replay\.gamma: gamma = 1 is not allowed: .*divides by zero"
    ):
        parse_recipe({"replay": {"gamma": 1.0}})
    for gamma in (-0.1, 1.5):
        with pytest.raises(RecipeError, match=r"replay\.gamma: must be in \[0, 1\)"):
            parse_recipe({"replay": {"gamma": gamma}})


def test_recipe_typo_unknown_key_and_range(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("generation:\n  temprature: 0.7\ntraining:\n  beta: -1\nfoo: 1\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    text = str(error.value)
    assert "generation.temprature: unknown key" in text
    assert "training.beta" in text and "foo: unknown key" in text and str(recipe) in text


def test_shipped_recipes_validate():
    for name in ("cpu-smollm2", "zephyr-7b", "llama3-8b"):
        load_recipe(ROOT / "recipes" / f"{name}.yaml")


def test_missing_model_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_model(str(tmp_path / "no-such-model"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)


def test_store_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=f"store {blocker}/store is not writable"):
        ArtifactStore(str(blocker / "store")).check_writable()


@pytest.mark.parametrize(
    "run_id", ["../escape", "", "/abs", "a/b", "ｒun", "a..b", "x" * 81, "t1\n", "t1 "]
)
def test_run_ids_cannot_escape(run_id):
    from dice_core.store import check_run_id

    with pytest.raises(StoreError, match="invalid run id"):
        check_run_id(run_id)


def test_store_keys_cannot_escape(tmp_path):
    store = ArtifactStore(str(tmp_path))
    for key in ("../x", "a/../../b", "a/./b", "ａ/b"):
        with pytest.raises(StoreError):
            store.path(key)


def test_stored_files_have_the_mode_of_the_umask(tmp_path):
    store = ArtifactStore(str(tmp_path))
    store.write_text("runs/r/a.txt", "x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "runs/r/a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
    bad = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a"}', "{oops"])
    out = tmp_path / "samples.jsonl"
    result = dice(
        "generate", "--model", str(tmp_path / "nope"), "--prompts", str(bad), "--out", str(out)
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "line 2: invalid JSON" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_cli_run_refuses_bad_recipe_before_any_work(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("replay:\n  gamma: 1\n")
    store = tmp_path / "store"
    result = dice("run", str(recipe), "--store", str(store))
    assert result.returncode == 2 and "gamma = 1 is not allowed" in result.stderr
    assert "Traceback" not in result.stderr
    assert not store.exists()


def test_cli_run_refuses_bad_data_and_batches_before_any_work(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    store = tmp_path / "store"
    cases = {
        f"data.prompts={prompts}": f"{prompts}: line 2: invalid JSON",
        "training.global_batch_size=7": "training.global_batch_size is 7",
        "data.prompts_per_round=1000": "prompts",
    }
    for override, expected in cases.items():
        result = dice("run", "tiny", "--store", str(store), "--set", override)
        assert result.returncode == 2 and expected in result.stderr, (override, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not store.exists()


def test_cli_run_refuses_missing_model_and_unwritable_store(tmp_path):
    result = dice(
        "run",
        "cpu-smollm2",
        "--set",
        f"models.sft={tmp_path}/missing",
        "--store",
        str(tmp_path / "s"),
    )
    assert result.returncode == 2 and "does not exist" in result.stderr
    blocker = tmp_path / "f"
    blocker.write_text("")
    result = dice("run", "cpu-smollm2", "--store", str(blocker / "s"))
    assert result.returncode == 2 and "is not writable" in result.stderr


def test_cli_pairs_on_files(tmp_path):
    rows = [
        {
            "prompt": p,
            "sample_index": k,
            "response": f"answer number {k} " * (k + 1),
            "finish_reason": "stop",
            "reward": float(k % 3),
        }
        for p in ("a", "b")
        for k in range(4)
    ]
    rewards = write_lines(tmp_path / "r.jsonl", [json.dumps(r) for r in rows])
    result = dice(
        "pairs",
        "--rewards",
        str(rewards),
        "--out",
        str(tmp_path / "pairs.jsonl"),
        "--curve",
        str(tmp_path / "curve.json"),
        "--set",
        "pairs.min_valid_samples=4",
        "--set",
        "generation.samples_per_prompt=4",
    )
    assert result.returncode == 0, result.stderr
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in pairs] == ["a", "b"]
    assert json.loads((tmp_path / "curve.json").read_text())["curve"]


def test_cli_stage_commands_give_one_line_for_bad_values_and_bytes(tmp_path):
    result = dice("replay", "--pairs", "x.jsonl", "--gamma", "1", "--out", str(tmp_path / "t"))
    assert result.returncode == 2 and "gamma = 1 is not allowed" in result.stderr
    assert "Traceback" not in result.stderr
    outputs = tmp_path / "outputs.json"
    outputs.write_bytes(b'[{"instruction": "\xff", "output": "x"}]')
    result = dice("evaluate", "--outputs", str(outputs), "--out", str(tmp_path / "e"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {outputs}: not UTF-8 text (byte 18)"
    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("reward", ["NaN", "Infinity", "true"])
def test_cli_pairs_refuses_a_reward_that_is_not_a_finite_number(tmp_path, reward):
    rewards = tmp_path / "rewards.jsonl"
    row = '{"prompt": "p", "sample_index": 0, "response": "hello", "finish_reason": "stop"'
    rewards.write_text(f'{row}, "reward": 1.5}}\n{row}, "reward": {reward}}}\n')
    result = dice("pairs", "--rewards", str(rewards), "--out", str(tmp_path / "pairs.jsonl"))
    assert result.returncode == 2
    assert f"{rewards}: record 2: field `reward` must be a finite number" in result.stderr
    assert not (tmp_path / "pairs.jsonl").exists()
