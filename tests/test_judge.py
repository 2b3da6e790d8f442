"""The AlpacaEval judge: protocol, order, parser, local and endpoint judges, judge server.

Endpoint tests run the real judge server on 127.0.0.1 in subprocesses, backed by a tiny
random model whose label tokens were made likely, so answers are real forward passes.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from dice_core.config import JudgeConfig
from dice_core.judge import (
    ANNOTATOR,
    JudgeError,
    Judgement,
    JudgeRequest,
    LocalJudge,
    OpenAIJudge,
    annotate,
    encode_messages,
    estimate_cost,
    is_swapped,
    load_protocol,
    make_judge,
    parse_completion,
)
from dice_core.judge_server import Faults, JudgeEngine, JudgeHTTPServer

DATA = Path(__file__).resolve().parents[1] / "dice_core" / "data" / "alpaca_eval"
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = DATA / "annotations" / "alpaca-7b.weighted_alpaca_eval_gpt4_turbo.annotations.json"
PLANTED_KEY = "sk-planted-7Qm2ZtX9vB4nL8pR"
KEY_ENV = "DICE_TEST_JUDGE_KEY"


@pytest.fixture(scope="module")
def shipped() -> list[dict]:
    """Real leaderboard judgements of alpaca-7b against gpt4_1106_preview."""
    return json.loads(SHIPPED.read_text())


@pytest.fixture(scope="module")
def rows(shipped) -> dict[str, list[str]]:
    """Six real instructions with the baseline's and alpaca-7b's outputs."""
    picked = shipped[:6]
    return {
        "instructions": [row["instruction"] for row in picked],
        "baseline_outputs": [row["output_1"] for row in picked],
        "model_outputs": [row["output_2"] for row in picked],
    }


@pytest.fixture(scope="module")
def judge_model_dir(tiny_model_dir, tmp_path_factory, rows) -> Path:
    """The tiny random model with "m" and "M" planted as its likeliest answers.

    Its last hidden state barely moves between prompts, so the label rows of an untied
    output layer point along the mean state (both labels on top) plus and minus the
    direction along which prompts differ most (the preference varies with the prompt).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    protocol = load_protocol()
    prompts = []
    columns = (rows["instructions"], rows["baseline_outputs"], rows["model_outputs"])
    for instruction, baseline, output in zip(*columns, strict=True):
        prompts.append(protocol.messages(instruction, baseline, output))
        prompts.append(protocol.messages(instruction, output, baseline))
    states = []
    for messages in prompts:
        ids = torch.tensor([encode_messages(tokenizer, messages)])
        with torch.no_grad():
            states.append(model.model(input_ids=ids).last_hidden_state[0, -1])
    states = torch.stack(states)
    mean = states.mean(0)
    mean_dir = mean / mean.norm()
    spread = torch.linalg.svd(states - mean, full_matrices=False).Vh[0]
    spread = spread - (spread @ mean_dir) * mean_dir
    spread = spread / (spread @ (states - mean).T).abs().max()
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    head.weight.data = model.get_input_embeddings().weight.data.clone()
    label_m, label_big_m = (tokenizer.convert_tokens_to_ids(token) for token in ("m", "M"))
    head.weight.data[label_m] = 2.0 * mean_dir + 1.5 * spread
    head.weight.data[label_big_m] = 2.0 * mean_dir - 1.5 * spread
    model.lm_head = head
    out = tmp_path_factory.mktemp("judge-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------
# Judge servers on 127.0.0.1


@dataclass
class Server:
    url: str
    log_path: Path | None = None

    def stats(self) -> dict[str, int]:
        root = self.url.removesuffix("/v1")
        return httpx.get(f"{root}/stats", timeout=10).json()


def _launch(model_dir: Path, log_path: Path, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "dice_core.judge_server", "--model", str(model_dir)]
    return subprocess.Popen(
        [*command, "--port", "0", *options],
        stdout=subprocess.PIPE,
        stderr=log_path.open("w"),
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def _wait_ready(process: subprocess.Popen, log_path: Path, timeout_s: float = 120.0) -> Server:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            line = process.stdout.readline()
            if line.startswith("judge server:"):
                return Server(line.split(" on ", 1)[1].strip(), log_path)
        if process.poll() is not None:
            raise RuntimeError(f"judge server exited early:\n{log_path.read_text()}")
    raise RuntimeError(f"judge server not ready after {timeout_s} s:\n{log_path.read_text()}")


@contextmanager
def _threaded(engine: JudgeEngine, name: str, faults: Faults) -> Iterator[Server]:
    server = JudgeHTTPServer(0, engine, name, faults)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{server.server_port}/v1")
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def servers(judge_model_dir, tmp_path_factory) -> Iterator[dict[str, Server]]:
    """Two servers started by their command (one failing every second request) and, to
    save start-up time, two malformed ones run in threads of this process."""
    folder = tmp_path_factory.mktemp("servers")
    processes = {
        "healthy": _launch(judge_model_dir, folder / "healthy.log"),
        "flaky": _launch(
            judge_model_dir,
            folder / "flaky.log",
            "--fail-fraction",
            "0.5",
            "--fail-status",
            "500,429",
        ),
    }
    engine = JudgeEngine(judge_model_dir)
    name = judge_model_dir.name
    try:
        with (
            _threaded(engine, name, Faults(malformed="no-logprobs")) as no_logprobs,
            _threaded(engine, name, Faults(malformed="no-labels")) as no_labels,
        ):
            started = {
                key: _wait_ready(process, folder / f"{key}.log")
                for key, process in processes.items()
            }
            yield {**started, "no_logprobs": no_logprobs, "no_labels": no_labels}
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(timeout=30)


def _api_judge(server: Server, **options) -> OpenAIJudge:
    options = {"backoff_s": 0.01, "show_progress": False, **options}
    return OpenAIJudge("tiny-judge", base_url=server.url, **options)


def _annotate(rows: dict[str, list[str]], judge, seed: int = 0) -> list[dict]:
    return annotate(**rows, judge=judge, seed=seed, generator="alpaca-7b")


# ----------------------------------------------------------------------------------------
# Protocol, parser and order, checked against alpaca_eval and its shipped judgements


def test_protocol_is_alpaca_evals_own(shipped):
    """Messages equal what alpaca_eval builds from its own template; settings are its own."""
    import pandas as pd
    from alpaca_eval import utils

    protocol = load_protocol()
    assert (protocol.max_tokens, protocol.top_logprobs, protocol.temperature) == (1, 5, 1.0)
    assert (protocol.numerator_token, protocol.denominator_tokens) == ("m", ("m", "M"))
    assert protocol.reference_model == "gpt-4-1106-preview"
    root = Path(utils.__file__).parent / "evaluators_configs" / "alpaca_eval_clf_gpt4_turbo"
    template = (root / "alpaca_eval_clf.txt").read_text()
    frame = pd.DataFrame(shipped[:5])[["instruction", "output_1", "output_2"]]
    prompts, _ = utils.make_prompts(frame, template)
    for prompt, row in zip(prompts, frame.itertuples(), strict=True):
        expected = utils.prompt_to_chatml(prompt)
        assert protocol.messages(row.instruction, row.output_1, row.output_2) == expected


def test_parser_and_order_reproduce_the_leaderboard(shipped):
    """Our parser plus the seed-0 coin give every shipped preference back, to 1e-9."""
    from alpaca_eval.completion_parsers import logprob_parser

    protocol = load_protocol()
    checked = 0
    for index, row in enumerate(shipped):
        if row["output_1"] == row["output_2"]:
            assert row["preference"] == 1.5
            continue
        request = JudgeRequest(index, row["instruction"], "", "")
        shown = parse_completion(row["raw_completion"], request, protocol, "error")
        reference = logprob_parser(row["raw_completion"], "m", ["m", "M"], is_binarize=False)[0]
        assert shown == pytest.approx(reference, abs=1e-12)
        swapped = is_swapped(row["instruction"], seed=0)
        assert (3 - shown if swapped else shown) == pytest.approx(row["preference"], abs=1e-9)
        checked += 1
    assert checked == 802


@dataclass
class FirstShownJudge:
    """A judge that always prefers the output shown first, and keeps what it was asked."""

    model_name: str = "first-shown"
    seen: list[JudgeRequest] = field(default_factory=list)

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        self.seen.extend(requests)
        return [Judgement(1.0, {"first": True}) for _ in requests]


def test_order_is_seeded_recorded_and_mapped_back():
    instructions = [f"Instruction number {i}: say something." for i in range(40)]
    model = [f"model answer {i}" for i in range(40)]
    baseline = [f"baseline answer {i}" for i in range(40)]
    baseline[7] = model[7]
    judge = FirstShownJudge()
    first = annotate(instructions, model, baseline, judge, seed=3, generator="model-x")
    again = annotate(instructions, model, baseline, FirstShownJudge(), seed=3, generator="model-x")
    other = annotate(instructions, model, baseline, FirstShownJudge(), seed=4, generator="model-x")

    swaps = [row["is_switched_outputs"] for row in first]
    assert swaps == [row["is_switched_outputs"] for row in again]
    assert swaps != [row["is_switched_outputs"] for row in other]
    assert 10 < sum(swaps) < 30
    for index, row in enumerate(first):
        if index == 7:
            assert row["preference"] == 1.5 and row["raw_completion"] is None
            continue
        assert row["preference"] == (2.0 if row["is_switched_outputs"] else 1.0)
        assert (row["output_1"], row["output_2"]) == (baseline[index], model[index])
        assert row["generator_1"] == "gpt4_1106_preview" and row["generator_2"] == "model-x"
        assert row["annotator"] == ANNOTATOR
    # Identical outputs are never sent; the shown order matches the recorded flag.
    assert [request.index for request in judge.seen] == [i for i in range(40) if i != 7]
    for request in judge.seen:
        assert (request.first == model[request.index]) == swaps[request.index]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 model outputs"):
        annotate(["a"], ["x", "y"], ["z"], FirstShownJudge(), seed=0, generator="g")


# ----------------------------------------------------------------------------------------
# Local judge


def test_local_and_api_judges_agree(judge_model_dir, servers, rows):
    """The same model behind the endpoint and read locally gives the same preferences."""
    local = _annotate(rows, LocalJudge(judge_model_dir, show_progress=False))
    remote = _annotate(rows, _api_judge(servers["healthy"]))
    preferences = [row["preference"] for row in local]
    assert all(1.0 <= value <= 2.0 for value in preferences)
    assert max(preferences) - min(preferences) > 0.05
    for ours, theirs in zip(local, remote, strict=True):
        assert ours["preference"] == pytest.approx(theirs["preference"], abs=1e-4)
        top_local = ours["raw_completion"]["logprobs"]["content"][0]["top_logprobs"]
        top_remote = theirs["raw_completion"]["logprobs"]["content"][0]["top_logprobs"]
        assert [item["token"] for item in top_local] == [item["token"] for item in top_remote]
        assert len(top_remote) == 5


def test_local_judge_truncates_outputs_not_the_template(judge_model_dir, rows):
    judge = LocalJudge(judge_model_dir, max_prompt_tokens=500, show_progress=False)
    request = JudgeRequest(
        0, rows["instructions"][1], rows["baseline_outputs"][1], rows["model_outputs"][1]
    )
    ids, truncated = judge.encode(request)
    assert truncated and 480 <= len(ids) <= 500
    text = judge.tokenizer.decode(ids)
    assert rows["instructions"][1] in text
    assert text.rstrip().endswith("## Best Model Identifier<|im_end|>\n<|im_start|>assistant")
    assert rows["model_outputs"][1][:100] in text

    annotations = _annotate(rows, judge)
    assert any(row["prompt_truncated"] for row in annotations)
    with pytest.raises(JudgeError, match=r"instruction 0 \('How did US states"):
        LocalJudge(judge_model_dir, max_prompt_tokens=300, show_progress=False).judge([request])


@pytest.mark.slow
def test_real_sft_model_as_local_judge(sft_model_dir):
    """SmolLM2-135M itself judges two instructions; weak, but a real judgement."""
    judge = make_judge(JudgeConfig(kind="local", model="sft"), sft_model_dir, None)
    judge.show_progress = False
    annotations = annotate(
        ["What is the capital of France?", "Name a primary colour."],
        ["The capital of France is Paris.", "Red is a primary colour."],
        ["Bananas are yellow and grow in bunches.", "I do not know."],
        judge,
        seed=0,
        generator="smollm2",
    )
    for row in annotations:
        assert 1.0 <= row["preference"] <= 2.0
        top = row["raw_completion"]["logprobs"]["content"][0]["top_logprobs"]
        assert {"m", "M"} & {item["token"] for item in top}
    assert annotations[0]["judge_model"] == sft_model_dir.name


# ----------------------------------------------------------------------------------------
# Endpoint judge against the judge server


def test_retries_ride_out_failing_requests(servers, rows):
    flaky, healthy = servers["flaky"], servers["healthy"]
    before = flaky.stats()
    # One request at a time: the server fails every second request, so a retry always
    # succeeds (with requests in flight together one request could meet every failure).
    remote = _annotate(rows, _api_judge(flaky, max_retries=1, concurrency=1))
    after = flaky.stats()
    assert after["failed"] - before.get("failed", 0) >= len(rows["instructions"]) // 2
    assert after["answered"] - before.get("answered", 0) == len(rows["instructions"])
    reference = _annotate(rows, _api_judge(healthy))
    for ours, theirs in zip(remote, reference, strict=True):
        assert ours["preference"] == pytest.approx(theirs["preference"], abs=1e-9)

    with pytest.raises(JudgeError, match=r"failed instruction \d .* 1 times; last: HTTP (500|429)"):
        _annotate(rows, _api_judge(flaky, max_retries=0, concurrency=1))


def test_malformed_answer_names_the_instruction(servers, rows):
    with pytest.raises(JudgeError) as error:
        _annotate(rows, _api_judge(servers["no_logprobs"], concurrency=1))
    message = str(error.value)
    assert "instruction 0 ('What are the names of some famous actors ...')" in message
    assert "no top log-probabilities" in message

    with pytest.raises(JudgeError, match=r"instruction 0 .*neither label \['m', 'M'\]"):
        _annotate(rows, _api_judge(servers["no_labels"], concurrency=1))
    missing = _annotate(rows, _api_judge(servers["no_labels"], on_missing_labels="nan"))
    assert all(row["preference"] is None for row in missing)


def test_rerun_is_served_from_the_cache(servers, rows, tmp_path):
    server = servers["healthy"]
    before = server.stats()["requests"]
    first = _annotate(rows, _api_judge(server, cache_dir=tmp_path))
    middle = server.stats()["requests"]
    second = _annotate(rows, _api_judge(server, cache_dir=tmp_path))
    assert middle - before == len(rows["instructions"])
    assert server.stats()["requests"] == middle
    assert [row["preference"] for row in first] == [row["preference"] for row in second]
    assert len(list(tmp_path.rglob("*.json"))) == len(rows["instructions"])
    # Another seed shows some outputs in the other order: a different request, not a hit.
    _annotate(rows, _api_judge(server, cache_dir=tmp_path), seed=5)
    assert server.stats()["requests"] > middle


def test_cost_is_estimated_and_refused_unless_confirmed(servers, rows, caplog, monkeypatch):
    server = servers["healthy"]
    prices = {"tiny-judge": (1000.0, 0.0)}
    before = server.stats()["requests"]
    with pytest.raises(JudgeError, match="above judge.confirm_cost_above_usd"):
        _annotate(rows, _api_judge(server, prices=prices, confirm_cost_above_usd=1.0))
    assert server.stats()["requests"] == before
    assert "estimated cost $" in caplog.text

    paid = _annotate(rows, _api_judge(server, prices=prices, confirm_cost=True))
    assert all(row["price_per_example"] > 0 for row in paid)
    monkeypatch.setenv("DICE_JUDGE_CONFIRM_COST", "1")
    _annotate(rows, _api_judge(server, prices=prices, confirm_cost_above_usd=1.0))
    monkeypatch.delenv("DICE_JUDGE_CONFIRM_COST")
    # A known model on a local endpoint costs nothing, so nothing asks for confirmation.
    free = OpenAIJudge("gpt-4-1106-preview", base_url=server.url, confirm_cost_above_usd=0.0)
    assert free.prices == {}

    bodies = [free.body(JudgeRequest(0, "Say hi.", "hi", "hello"))]
    assert estimate_cost(bodies, "gpt-4-1106-preview", {"gpt-4-1106-preview": (10.0, 30.0)}).usd > 0
    assert estimate_cost(bodies, "unknown-model", {"gpt-4-1106-preview": (10.0, 30.0)}).usd == 0


def test_planted_key_never_leaks(servers, rows, tmp_path, caplog, monkeypatch):
    import logging

    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    caplog.set_level(logging.DEBUG)
    cache = tmp_path / "cache"
    with_key = servers["flaky"].stats().get("with_key", 0)
    annotations = _annotate(
        rows, _api_judge(servers["flaky"], api_key_env=KEY_ENV, cache_dir=cache, concurrency=1)
    )
    assert servers["flaky"].stats()["with_key"] > with_key
    errors = []
    for name in ("no_logprobs", "no_labels"):
        with pytest.raises(JudgeError) as error:
            _annotate(rows, _api_judge(servers[name], api_key_env=KEY_ENV))
        errors.append(str(error.value))
    judge = _api_judge(servers["healthy"], api_key_env=KEY_ENV)

    texts = [caplog.text, json.dumps(annotations), repr(judge), *errors]
    texts += [path.read_text() for path in cache.rglob("*") if path.is_file()]
    texts += [server.log_path.read_text() for server in servers.values() if server.log_path]
    assert len(list(cache.rglob("*.json"))) == len(rows["instructions"])
    for text in texts:
        assert PLANTED_KEY not in text


def test_missing_key_for_a_remote_endpoint_is_refused(monkeypatch):
    """Refused before any request: the remote address is never contacted."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    judge = OpenAIJudge("gpt-4o-mini", base_url="https://judge.invalid/v1", api_key_env=KEY_ENV)
    with pytest.raises(JudgeError, match=f"{KEY_ENV} is not set"):
        judge.judge([JudgeRequest(0, "Say hi.", "hi", "hello")])


def test_server_lists_its_model_and_rejects_bad_requests(servers, judge_model_dir):
    server = servers["healthy"]
    listed = httpx.get(f"{server.url}/models", timeout=10).json()
    assert [model["id"] for model in listed["data"]] == [judge_model_dir.name]
    response = httpx.post(
        f"{server.url}/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50},
        timeout=10,
    )
    assert response.status_code == 400
    assert "top_logprobs" in response.json()["error"]["message"]


def test_rate_limit_spaces_requests(servers, rows):
    judge = _api_judge(servers["healthy"], requests_per_minute=600, concurrency=4)
    started = time.monotonic()
    _annotate(rows, judge)
    assert time.monotonic() - started >= 0.1 * (len(rows["instructions"]) - 1)


def test_make_judge_follows_the_recipe(servers, tmp_path):
    config = JudgeConfig(kind="openai", model="tiny-judge", base_url=servers["healthy"].url)
    judge = make_judge(config, None, tmp_path)
    assert isinstance(judge, OpenAIJudge) and judge.base_url == servers["healthy"].url
    with pytest.raises(ValueError, match="SFT model folder"):
        make_judge(JudgeConfig(kind="local", model="sft"), None, None)


def test_cli_evaluate_scores_an_outputs_file_in_alpaca_evals_formats(shipped, servers, tmp_path):
    """`dice evaluate --outputs` judges someone else's outputs; alpaca_eval reads the result."""
    from alpaca_eval.metrics import get_winrate

    # alpaca-7b's answers (short enough for the tiny judge's context) to the first three
    # instructions, then two more that the subset does not ask for, as an outputs file.
    lines = (DATA / "instructions.jsonl").read_text().splitlines()
    first = [json.loads(line)["instruction"] for line in lines[:3]]
    answers = {row["instruction"]: row["output_2"] for row in shipped}
    extra = [row["instruction"] for row in shipped if row["instruction"] not in first][:2]
    source = [
        {"instruction": instruction, "output": answers[instruction], "generator": "alpaca-7b"}
        for instruction in extra + first[::-1]  # any order: matched by instruction
    ]
    outputs = tmp_path / "alpaca-7b.json"
    outputs.write_text(json.dumps(source[:5]))  # more rows than asked for: the subset is picked
    out = tmp_path / "scored"
    command = [sys.executable, "-m", "flows.cli", "evaluate", "--outputs", str(outputs)]
    command += ["--limit", "3", "--out", str(out), "--set", "evaluation.judge.kind=openai"]
    command += ["--set", "evaluation.judge.model=tiny-judge"]
    command += ["--set", f"evaluation.judge.base_url={servers['healthy'].url}"]
    env = {**os.environ, "HOME": str(tmp_path)}  # a fresh judge cache
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    judged = json.loads((out / "model_outputs.json").read_text())
    assert [row["instruction"] for row in judged] == first
    annotations = json.loads((out / "annotations.json").read_text())
    assert len(annotations) == 3
    for row, instruction in zip(annotations, first, strict=True):
        assert row["instruction"] == instruction
        assert row["output_2"] == answers[instruction] and row["generator_2"] == "alpaca-7b"
        assert row["generator_1"] == "gpt4_1106_preview" and 1.0 <= row["preference"] <= 2.0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["win_rate"] == pytest.approx(get_winrate(annotations)["win_rate"], abs=1e-9)


def test_an_outputs_file_missing_an_instruction_is_refused(tmp_path):
    outputs = tmp_path / "partial.json"
    lines = (DATA / "instructions.jsonl").read_text().splitlines()
    first = [json.loads(line)["instruction"] for line in lines[:3]]
    outputs.write_text(json.dumps([{"instruction": first[0], "output": "Hello."}]))
    command = [sys.executable, "-m", "flows.cli", "evaluate", "--outputs", str(outputs)]
    command += ["--limit", "3", "--out", str(tmp_path / "scored")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {outputs}: no record answers AlpacaEval instruction 1 ({first[1][:60]!r}); "
        "the evaluation needs the first 3 instructions"
    ]
    assert not (tmp_path / "scored").exists()
