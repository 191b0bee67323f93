"""`saescope explain`: the protocol against real HTTP servers (tests/llm_server.py), the parsing
of answers, the detection score, the JSONL artifact and its resumption, and the messages for a
server that is down, slow or answers garbage. The bundled SmolLM2 answers in the slow tests."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import pytest
import torch

from saescope.cli import main
from tests.llm_server import Reply, SmolLM2Chat, chat_server, excerpts, failing_after, fixed_answers
from trainer import runfolder
from trainer.chat import ChatClient, ChatError, ChatServer, chat_content, completions_url
from trainer.errors import ConfigError, RunFolderError
from trainer.inference import LatentEncoder
from trainer.llm_explain import (
    ExampleSource,
    LatentTask,
    LlmExplainConfig,
    Snippet,
    TextWriter,
    explain_latent,
    parse_detection,
    parse_explanation,
    parse_latents,
    pool_firings,
)
from trainer.llm_explanations import (
    LLM_EXPLANATIONS_FILE,
    LlmExplanation,
    LlmExplanationWriter,
    balanced_accuracy,
    load_llm_explanations,
)
from trainer.runconfig import RunConfig


@pytest.fixture
def run(tiny_run, tmp_path):
    """A copy of the tiny harvested run (its store left behind: explain needs none)."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("activations"))
    return out


def explain(run, url, *options, model="fixed") -> int:
    return main(["explain", str(run), "--llm-url", url, "--llm-model", model, "--negative-pool", "64", *options])


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / LLM_EXPLANATIONS_FILE).read_text().splitlines()]


# ---------------------------------------------------------------- pieces


def test_the_endpoint_of_a_server_address():
    assert completions_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080/v1/chat/completions"
    assert completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert completions_url("https://api.example.com/v1") == "https://api.example.com/v1/chat/completions"
    assert completions_url("http://h/proxy/chat/completions") == "http://h/proxy/chat/completions"
    with pytest.raises(ConfigError, match="http"):
        completions_url("127.0.0.1:8080")
    with pytest.raises(ConfigError, match="--llm-model"):
        ChatServer("http://h", " ")
    assert "key" not in repr(ChatServer("http://h", "m", api_key="secret-key"))


def test_latent_specs():
    density = torch.tensor([0.1, 0.0, 0.3, 0.2, 0.05, 0.0])
    assert parse_latents("all", density) == [0, 2, 3, 4]
    assert parse_latents("0-2,5", density) == [0, 1, 2, 5]  # ranges as given: explain_run leaves out the dead
    assert parse_latents("top:2", density) == [2, 3]
    assert parse_latents("random:3", density, seed=1) == parse_latents("random:3", density, seed=1)
    assert set(parse_latents("random:3", density)) <= {0, 2, 3, 4} and len(parse_latents("random:3", density)) == 3
    assert parse_latents("top:2, 4", density) == [2, 3, 4]
    for bad, message in [("6", "past the SAE's latents"), ("3-1", "backwards"), ("top:", "not 'all'"),
                         ("first:3", "not 'all'"), ("", "give 'all'"), ("1,,2", "give 'all'"), ("-1", "not 'all'")]:
        with pytest.raises(ConfigError, match=message):
            parse_latents(bad, density)


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="even"):
        LlmExplainConfig(score_contexts=5)
    with pytest.raises(ConfigError, match="--concurrency"):
        LlmExplainConfig(concurrency=0)
    with pytest.raises(ConfigError, match="--timeout"):
        LlmExplainConfig(timeout=0)


def test_answers_are_parsed_or_refused():
    assert parse_explanation("Explanation: the keyword def.") == "the keyword def"
    assert parse_explanation("Sure!\nExplanation: **'import' statements**\nMore text") == "'import' statements"
    assert parse_explanation("  names of modules. They appear after import") == "names of modules"
    for garbage in ("", "Explanation:", "Explanation: ...", "***"):
        with pytest.raises(ChatError, match="no explanation"):
            parse_explanation(garbage)
    assert parse_detection("[1, 0, 0, 1]", 4) == [True, False, False, True]
    assert parse_detection("The answer: ['1','0']", 2) == [True, False]
    assert parse_detection("1, 0, 1", 3) == [True, False, True]  # no brackets: the numbers standing alone
    with pytest.raises(ChatError, match="lists 3 numbers for 4"):
        parse_detection("[1, 0, 1]", 4)
    with pytest.raises(ChatError, match="not a list of 2 numbers"):
        parse_detection("yes and no", 2)
    with pytest.raises(ChatError, match="not a list of 2 numbers"):
        parse_detection("1. foo 2. bar 3.5", 2)


def test_chat_content_says_what_a_bad_answer_is():
    assert chat_content(b'{"choices": [{"message": {"content": "hi"}}]}') == "hi"
    with pytest.raises(ChatError, match="not JSON"):
        chat_content(b"<html>")
    with pytest.raises(ChatError, match="not a chat completion"):
        chat_content(b'{"choices": []}')
    with pytest.raises(ChatError, match="not text"):
        chat_content(b'{"choices": [{"message": {"content": null}}]}')


def test_balanced_accuracy_on_a_hand_case():
    assert balanced_accuracy(3, 1, 2, 2) == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert balanced_accuracy(5, 0, 0, 5) == 0.5  # "fires" to everything is chance
    with pytest.raises(ValueError):
        balanced_accuracy(2, 1, 0, 0)


def test_one_latent_is_explained_and_scored_over_http():
    """Two requests: the examples shown with «marks», then the held-out contexts without; the
    counts and the score from the server's answer against where the latent fires."""
    vocab = ["a", " b", "\n", " def", "x"]
    task = LatentTask(
        latent=7,
        shown=[Snippet((2, 3, 4), (False, True, False)), Snippet((0, 3, 1, 1), (False, True, True, False))],
        scored=[Snippet((3, 4), (False, False))] * 6,
        fires=[True, True, True, False, False, False],
    )
    said = "[1, 1, 0, 0, 1, 0]"  # 2 of 3 firing said to fire; 1 of 3 silent said to fire

    def answer(request):
        return Reply(said if excerpts(request) else "Explanation: the def keyword.")

    with chat_server(answer) as server:
        record = explain_latent(ChatClient(ChatServer(server.url, "m")), task, TextWriter(vocab, None))
    assert record.ok and record.text == "the def keyword"
    assert (record.true_positives, record.false_negatives, record.true_negatives, record.false_positives) == (2, 1, 2, 1)
    assert record.score == pytest.approx(balanced_accuracy(2, 1, 2, 1)) == pytest.approx(2 / 3)
    assert record.n_scored == 6 and record.model == "m" and record.url == f"{server.url}/v1/chat/completions"
    shown, scored = (request["messages"][-1]["content"] for request in server.requests)
    assert "1. ↵« def»x\n2. a« def b» b" in shown  # marks, runs joined, ↵ for the line break
    assert "«" not in scored and "Explanation: the def keyword" in scored and "list of 6 numbers" in scored
    assert all(request["temperature"] == 0 and request["model"] == "m" for request in server.requests)


def test_held_out_contexts_are_unseen_and_split_half_and_half(run):
    """The scored contexts that fire are harvest examples the explanation was not shown; the
    windows that do not fire hold no counted firing of the latent (checked against the SAE)."""
    cfg_run = RunConfig.load(run)
    harvest = runfolder.load_harvest(run, cfg_run)
    cfg = LlmExplainConfig(explain_top=5, explain_quantile=5, score_contexts=8, window=12, negative_pool=48)
    pool = pool_firings(run, cfg_run, harvest, cfg.negative_pool, cfg.seed)
    encoder = LatentEncoder.from_run(run)
    tokens = harvest.token_ids.numpy()
    counted = torch.from_numpy(cfg_run.positions.mask(tokens[pool.rows], encoder.lm.special_token_ids))
    for p in (0, 7):
        direct = encoder.encode_ids(tokens[pool.rows[p]].tolist())  # (T, n)
        listed = torch.zeros_like(direct, dtype=torch.bool)
        mine = torch.from_numpy(pool.latents[p]).long()
        listed.scatter_(1, mine.clamp_min(0), mine >= 0)
        assert torch.equal(listed, (direct > 0) & counted[p][:, None])

    source = ExampleSource(harvest, cfg, pool)
    latent = int(torch.argsort(harvest.density)[len(harvest.density) // 2])  # a latent of middling density
    task = source.task(latent)
    assert len(task.shown) == 10 and len(task.scored) == 8 and sum(task.fires) == 4
    shown = {s.token_ids for s in task.shown}
    for snippet, fires_there in zip(task.scored, task.fires):
        assert snippet.token_ids not in shown and len(snippet.token_ids) == 12
        assert any(snippet.firing) == fires_there
    silent = [s.token_ids for s, fires_there in zip(task.scored, task.fires) if not fires_there]
    for ids in silent:  # each silent window sits in a pool context where the latent is silent over it
        where = [(p, start) for p in range(len(pool.rows)) for start in range(tokens.shape[1] - 11)
                 if tuple(tokens[pool.rows[p], start:start + 12].tolist()) == ids]
        assert any(not (pool.latents[p, start:start + 12] == latent).any() for p, start in where)
    assert task == source.task(latent)  # seeded


# ---------------------------------------------------------------- the stage, resumed


def test_explain_stores_each_latent_and_a_second_run_goes_on(run, capsys):
    with chat_server(fixed_answers()) as server:
        assert explain(run, server.url, "--latents", "0-3", "--concurrency", "3") == 0
        assert len(server.requests) == 8  # two per latent
        assert explain(run, server.url, "--latents", "0-5") == 0
        assert len(server.requests) == 12  # only 4 and 5
    assert "explained 2 latents with fixed" in capsys.readouterr().out
    found = load_llm_explanations(run, 64)
    assert [r.latent for r in found.ok] == [0, 1, 2, 3, 4, 5] and not found.failed
    for r in found.ok:
        assert r.text == "names in Python source code" and r.prompt_version == 1
        # 5 contexts that fire; 5 that do not, fewer for a latent that fires in most of the pool
        assert r.true_positives + r.false_negatives == 5 and 1 <= r.true_negatives + r.false_positives <= 5
        assert r.score == pytest.approx(balanced_accuracy(r.true_positives, r.false_negatives, r.true_negatives,
                                                          r.false_positives))
    # Another model is another source: all of its latents are asked again.
    with chat_server(fixed_answers()) as server:
        assert explain(run, server.url, "--latents", "0", model="other") == 0
        assert len(server.requests) == 2
    assert {r.model for r in load_llm_explanations(run).records} == {"fixed", "other"}


@pytest.mark.parametrize("mode, message", [
    ("500", "answered HTTP 500: {\"error\": {\"message\": \"the model crashed\"}} (after 2 tries)"),
    ("garbage", "answered something that is not JSON: '<html>Bad gateway, sort of</html>'"),
    ("not-chat", "answered JSON that is not a chat completion"),
])
def test_a_server_that_breaks_midway_keeps_what_was_done(run, capsys, mode, message):
    """The server answers 6 requests (3 latents), then fails: each later latent is recorded with
    the reason and printed; the run exits 2 saying how to go on; a second, working server on
    another port finishes only the rest."""
    with chat_server(failing_after(fixed_answers(), 6, mode)) as server:
        code = explain(run, server.url, "--latents", "0-7", "--concurrency", "1", "--retries", "1")
    assert code == 2
    err = capsys.readouterr().err
    assert f"latent 3: {server.url}/v1/chat/completions {message}" in err
    assert "5 latents failed and 5 are not explained; what was done is kept: run the same command again" in err
    found = load_llm_explanations(run, 64)
    assert [r.latent for r in found.ok] == [0, 1, 2] and [r.latent for r in found.failed] == [3, 4, 5, 6, 7]
    assert all(message in r.error for r in found.failed)
    with chat_server(fixed_answers()) as second:
        assert explain(run, second.url, "--latents", "0-7") == 0
        assert len(second.requests) == 10  # the 5 failed latents, twice each
    assert [r.latent for r in load_llm_explanations(run, 64).ok] == list(range(8))


def test_a_server_that_is_down_stops_the_run_after_a_few_latents(run, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    url = f"http://127.0.0.1:{port}"
    code = explain(run, url, "--latents", "0-20", "--concurrency", "1", "--retries", "0", "--max-failures", "3")
    assert code == 2
    err = capsys.readouterr().err
    assert f"latent 0: cannot reach {url}/v1/chat/completions: [Errno 111] Connection refused (is the server running?)" in err
    assert "stopped: the last 3 latents failed; 3 latents failed and 21 are not explained" in err
    assert [r.latent for r in load_llm_explanations(run).failed] == [0, 1, 2]


def test_a_slow_server_times_out_with_a_clear_message(run, capsys):
    with chat_server(failing_after(fixed_answers(), 0, "hang", hang=2)) as server:
        began = time.perf_counter()
        assert explain(run, server.url, "--latents", "0", "--timeout", "0.3", "--retries", "1") == 2
        assert time.perf_counter() - began < 2.5 + 2  # 2 tries of 0.3 s and a backoff, then the model's pass
    err = capsys.readouterr().err
    assert f"latent 0: {server.url}/v1/chat/completions did not answer within 0.3 s (--timeout) (after 2 tries)" in err


def test_rate_limits_and_server_errors_are_retried_with_backoff(run):
    calls = {"n": 0}
    lock = threading.Lock()

    def answer(request):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 1:
            return Reply(status=429, body=b'{"error": "slow down"}')
        if n == 2:
            return Reply(status=503, body=b"busy")
        return fixed_answers()(request)

    with chat_server(answer) as server:
        assert explain(run, server.url, "--latents", "0", "--retries", "2") == 0
    assert calls["n"] == 4 and load_llm_explanations(run).ok[0].latent == 0


def test_a_client_error_is_not_retried():
    with chat_server(lambda request: Reply(status=404, body=b'{"error": "model not found"}')) as server:
        with pytest.raises(ChatError, match='answered HTTP 404: {"error": "model not found"}$'):
            ChatClient(ChatServer(server.url, "nope"), retries=3).complete([{"role": "user", "content": "hi"}], 5)
        assert len(server.requests) == 1


def test_requests_in_flight_never_exceed_the_concurrency(run):
    state = {"now": 0, "most": 0}
    lock = threading.Lock()
    fixed = fixed_answers(0.1)

    def answer(request):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            return fixed(request)
        finally:
            with lock:
                state["now"] -= 1

    with chat_server(answer) as server:
        assert explain(run, server.url, "--latents", "0-11", "--concurrency", "4") == 0
    assert state["most"] == 4


def test_an_api_key_is_sent_from_the_named_variable(run, monkeypatch, capsys):
    monkeypatch.setenv("SAESCOPE_TEST_KEY", "sk-test-123")
    with chat_server(fixed_answers()) as server:
        assert explain(run, server.url, "--latents", "0", "--api-key-env", "SAESCOPE_TEST_KEY") == 0
    assert all(r["_headers"]["Authorization"] == "Bearer sk-test-123" for r in server.requests)
    assert "sk-test" not in (run / LLM_EXPLANATIONS_FILE).read_text()
    assert explain(run, server.url, "--latents", "0", "--api-key-env", "SAESCOPE_NO_SUCH_KEY") == 2
    assert "SAESCOPE_NO_SUCH_KEY: that environment variable is not set or empty" in capsys.readouterr().err


def test_bad_input_changes_nothing(run, capsys):
    assert explain(run, "http://127.0.0.1:9", "--latents", "64") == 2
    assert "--latents: '64' is past the SAE's latents (0-63)" in capsys.readouterr().err
    assert explain(run, "ftp://x", "--latents", "0") == 2
    assert "--llm-url 'ftp://x': give the server's http(s) address" in capsys.readouterr().err
    assert not (run / LLM_EXPLANATIONS_FILE).exists()


# ---------------------------------------------------------------- the artifact


def test_a_line_cut_short_by_a_kill_is_ignored_and_cut_off(run):
    ok = LlmExplanation(latent=1, model="m", url="u", prompt_version=1, status="ok", text="t", score=0.5,
                        true_positives=1, false_negatives=1, true_negatives=1, false_positives=1)
    path = run / LLM_EXPLANATIONS_FILE
    path.write_text(ok.to_json() + "\n" + ok.to_json()[:30])  # killed in the middle of the second line
    assert [r.latent for r in load_llm_explanations(run).records] == [1]
    with LlmExplanationWriter(run) as out:
        out.append(LlmExplanation(latent=2, model="m", url="u", prompt_version=1, status="error", error="boom"))
    assert [json.loads(line)["latent"] for line in path.read_text().splitlines()] == [1, 2]
    found = load_llm_explanations(run)
    assert found.done("m", 1) == {1} and [r.error for r in found.failed] == ["boom"]


def test_a_broken_record_names_its_line(run):
    path = run / LLM_EXPLANATIONS_FILE
    good = LlmExplanation(latent=1, model="m", url="u", prompt_version=1, status="error", error="x").to_json()
    for bad, message in [("{not json", "line 2: not valid JSON"), ('{"latent": 1}', "line 2: not an explanation record .no model"),
                         (good.replace('"status": "error"', '"status": "odd"'), "line 2: status 'odd' is neither ok nor error"),
                         (good.replace('"status": "error"', '"status": "ok"'), "line 2: an ok record without text"),
                         ("[1]", "line 2: not an explanation record")]:
        path.write_text(f"{good}\n{bad}\n")
        with pytest.raises(RunFolderError, match=message):
            load_llm_explanations(run, 64)
    path.write_text(f"{good}\n" + good.replace('"latent": 1', '"latent": 99') + "\n")
    with pytest.raises(RunFolderError, match="line 2: latent 99, but the SAE has 64 latents"):
        load_llm_explanations(run, 64)


def test_one_writer_at_a_time(run):
    with LlmExplanationWriter(run):
        with pytest.raises(RunFolderError, match="another `saescope explain` is writing it"):
            with LlmExplanationWriter(run):
                pass


def test_retraining_drops_the_explanations_of_the_old_weights(run):
    (run / LLM_EXPLANATIONS_FILE).write_text("")
    runfolder.drop_harvest(run)
    assert not (run / LLM_EXPLANATIONS_FILE).exists()


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2_server():
    with chat_server(SmolLM2Chat(max_new_tokens=24)) as server:
        yield server


@pytest.mark.slow  # ~40 s on 2 busy cores: SmolLM2-135M loaded, 4 short generations
def test_smollm2_explains_and_scores_two_latents(run, smollm2_server, capsys):
    """The bundled SmolLM2-135M-Instruct through transformers and its chat template, behind a
    real HTTP server: whatever it answers, each latent ends as a record that parses, with a score
    that is its counts' balanced accuracy, or an error that says what the answer was."""
    code = explain(run, smollm2_server.url, "--latents", "10,11", "--explain-top", "3", "--explain-quantile", "2",
                   "--score-contexts", "4", "--window", "10", "--concurrency", "2", model="SmolLM2-135M-Instruct")
    found = load_llm_explanations(run, 64).records
    assert [r.latent for r in found] == [10, 11]
    assert code == (0 if all(r.ok for r in found) else 2)
    for r in found:
        if r.ok:
            assert r.text and r.n_scored == 4 and r.true_positives + r.false_negatives == 2
            assert r.score == pytest.approx(balanced_accuracy(r.true_positives, r.false_negatives, r.true_negatives,
                                                              r.false_positives))
        else:
            assert r.error.startswith("the answer ")
    assert any(r.ok for r in found)  # with its few-shot prompt, the small model answers in form
    assert len(smollm2_server.requests) == 2 * len(found) - sum(1 for r in found if not r.ok and "explanation" in r.error)


@pytest.mark.slow  # ~15 s: a CLI process started, killed and run again
@pytest.mark.multiprocess
def test_a_killed_run_goes_on_where_it_stopped(run):
    """`saescope explain` killed (SIGKILL) while latents are in flight: every line written is a
    whole record, and the next run asks only for the latents without one."""
    import os
    import signal
    import subprocess
    import sys

    from tests.app.servers import ROOT

    with chat_server(fixed_answers(0.15)) as server:
        command = [sys.executable, "-m", "saescope.cli", "explain", str(run), "--llm-url", server.url, "--llm-model",
                   "fixed", "--latents", "0-15", "--concurrency", "2", "--negative-pool", "64"]
        proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = run / LLM_EXPLANATIONS_FILE
        deadline = time.monotonic() + 120
        while not (path.exists() and path.read_text().count("\n") >= 4):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before the kill"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = load_llm_explanations(run, 64).done("fixed", 1)
        assert 4 <= len(done) < 16
        asked = len(server.requests)
        assert explain(run, server.url, "--latents", "0-15") == 0
        assert len(server.requests) - asked == 2 * (16 - len(done))  # only the latents without a record
    assert sorted(load_llm_explanations(run, 64).done("fixed", 1)) == list(range(16))


def test_a_server_that_does_not_speak_http_is_a_clear_error():
    """A port where something else listens (it answers a line that is not HTTP, then closes)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with pytest.raises(ChatError, match=r"answered something that is not HTTP, or cut its answer short \(BadStatusLine"):
        ChatClient(ChatServer(url, "m"), retries=1, backoff=0.01).complete([{"role": "user", "content": "hi"}], 5)
    thread.join(5)
    listener.close()
