"""report.html: the page's data (escaping, caps, what each browser holds) and the page itself, opened in
headless Chromium (Debian's `chromium`, driven over the DevTools protocol) as a person would use it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from icr.evaluation.results import append_results
from icr.report import write_report
from icr.report_html import (
    MAX_TEXT_CHARS,
    clip_text,
    embed_json,
    page_data,
    render_page,
    sample_ids,
    write_html_report,
)
from icr.runs import text_hash, write_jsonl

from .test_report_html_mt_bench import add_mt_bench

REPO = Path(__file__).resolve().parents[1]
HOSTILE = '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"><b>bold</b> & <!--'
PREFIX = "Please answer using only {language}.\n\n"


# --- a run folder written by hand (no models): shards, pairs, stats, judge cache, evaluation files ---

def _scored(pid: str, lang: str, sample: int, text: str, reward: float) -> dict:
    prompts = {"en": "Name a colour.", "es": "Nombra un color."}
    return {"finished": True, "id": pid, "lang": lang, "prompt": f"{prompts[lang]} ({pid})", "response": text,
            "n_tokens": len(text.split()), "reward": reward, "sample": sample, "logp_policy": 0.0,
            "logp_reference": 0.0, "reward_tokens": 1}


def _hand_run(root: Path, n_prompts: int = 30) -> Path:
    run = root / "hand"
    records = [_scored(f"p{i:03d}", lang, s, f"{lang} answer {s} " + "x" * (5 * s), float((i + 3 * s) % 7))
               for i in range(n_prompts) for lang in ("en", "es") for s in range(3)]
    write_jsonl(run / "iter1" / "score" / "shard-00000.jsonl", records)
    pairs = []
    for i in range(n_prompts):
        for lang in ("en", "es"):
            mine = [r for r in records if r["id"] == f"p{i:03d}" and r["lang"] == lang]
            best, worst = max(mine, key=lambda r: r["reward"] - 0.1 * len(r["response"])), min(
                mine, key=lambda r: r["reward"] - 0.1 * len(r["response"]))
            pairs.append({"id": best["id"], "lang": lang, "prompt": best["prompt"], "chosen": best["response"],
                          "rejected": worst["response"], "chosen_reward": best["reward"],
                          "rejected_reward": worst["reward"], "chosen_sample": best["sample"],
                          "rejected_sample": worst["sample"], "alpha": 0.1})
    write_jsonl(run / "iter1" / "pairs" / "pairs.jsonl", pairs)
    (run / "iter1" / "pairs" / "stats.json").write_text(json.dumps({"per_language": {
        lang: {"alpha": 0.1, "n_prompts": n_prompts, "n_pairs": n_prompts} for lang in ("en", "es")}}))
    (run / "config.yaml").write_text(json.dumps({"languages": ["en", "es"], "reward": {"prefix": PREFIX},
                                                 "pairs": {"length_unit": "chars"},
                                                 "evaluation": {"judge": "fake"}}))
    # the judge scored every sample: score = its sample number (so it prefers longer answers)
    write_jsonl(run / "eval" / "judge_cache.jsonl", [
        {"key": text_hash("fake", "score", r["lang"], r["prompt"], r["response"], ""), "kind": "score",
         "id": r["id"], "lang": r["lang"], "value": float(r["sample"])} for r in records])
    for model, pref in (("M0", 1.0), ("M1", 0.0)):
        out = run / "eval" / model / "es"
        out.mkdir(parents=True)
        (out / "model_outputs.json").write_text(json.dumps(
            [{"instruction": f"Pregunta {i}", "output": f"{model} dice {i}", "generator": model, "dataset": "d",
              "id": f"q{i}"} for i in range(n_prompts)]))
        (out / "judgements.fake.json").write_text(json.dumps(
            [{"id": f"q{i}", "preference": pref if i % 2 else 0.5} for i in range(n_prompts)]))
    return run


def test_embedded_json_cannot_close_its_script_element():
    data = {"answer": HOSTILE, "separators": "a\u2028b\u2029c", "unicode": "ñandú ру"}
    text = embed_json(data)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == data
    page = render_page({"run": "</title><script>x()</script>", "overview": [], "notes": [HOSTILE],
                        "pairs": {"prompts": [], "counts": [], "judge": None, "notes": []},
                        "evaluation": {"models": [], "judges": [], "prompts": [], "counts": [], "notes": []},
                        "limits": {"max_pair_prompts": 1, "max_eval_prompts": 1, "max_text_chars": 1}})
    start = page.index('<script type="application/json" id="icr-data">')
    end = page.index("</script>", start)
    assert json.loads(page[page.index(">", start) + 1:end])["notes"] == [HOSTILE]
    assert "<title>ICR run report: &lt;/title&gt;&lt;script&gt;x()" in page  # the title is escaped too
    assert page.count("<script") == 2 and "innerHTML" not in page


def test_sample_of_prompts_is_deterministic_and_parallel():
    ids = [f"p{i}" for i in range(100)]
    picked = sample_ids(ids, 10)
    assert len(picked) == 10 and picked == sample_ids(ids, 10) == sorted(picked, key=ids.index)
    assert sample_ids(list(reversed(ids)), 10) == list(reversed(picked))  # the same prompts in any order
    assert sample_ids(ids, None) == ids == sample_ids(ids, 1000)
    assert clip_text("y" * (MAX_TEXT_CHARS + 7)).endswith("… [7 more characters not embedded]")
    assert clip_text(None) == "" and clip_text("short") == "short"


def test_pair_browser_data_caps_ranks_and_agrees(tmp_path):
    run = _hand_run(tmp_path)
    data = page_data(run, max_pair_prompts=8, max_eval_prompts=5)
    pairs = data["pairs"]
    assert pairs["judge"] == "fake"
    assert sorted((c["lang"], c["shown"], c["total"]) for c in pairs["counts"]) == [("en", 8, 30), ("es", 8, 30)]
    by_lang = {lang: [p["id"] for p in pairs["prompts"] if p["lang"] == lang] for lang in ("en", "es")}
    assert by_lang["en"] == by_lang["es"] and len(by_lang["en"]) == 8  # the same prompts in every language
    entry = next(p for p in pairs["prompts"] if p["lang"] == "es")
    rewards = [s["reward"] for s in entry["samples"]]
    assert rewards == sorted(rewards, reverse=True)
    for s in entry["samples"]:  # the pairs stage's score: reward - alpha * characters
        assert s["score"] == pytest.approx(s["reward"] - 0.1 * s["chars"], abs=1e-3)
        assert s["judge"] == s["sample"] and s["detected"] in ("es", "en", None)
    judge = {s["sample"]: s["judge"] for s in entry["samples"]}
    assert entry["agreement"] == ("agrees" if judge[entry["chosen"]] > judge[entry["rejected"]] else "disagrees")
    # G(x): the English instruction of the same prompt id behind the language prefix
    assert entry["reward_prompt"] == f"Please answer using only Spanish.\n\nName a colour. ({entry['id']})"
    assert entry["prompt"] == f"Nombra un color. ({entry['id']})"
    ev = data["evaluation"]
    assert ev["models"] == ["M0", "M1"] and ev["judges"] == ["fake"] and ev["counts"] == [
        {"lang": "es", "shown": 5, "total": 30}]
    q = ev["prompts"][0]
    assert q["answers"]["M0"]["text"].startswith("M0 dice") and q["reference"] is None
    assert q["answers"]["M1"]["preference"]["fake"] in (0.0, 0.5)
    assert len(page_data(run, max_pair_prompts=None)["pairs"]["prompts"]) == 60


def test_same_run_folder_same_page_bytes_and_texts_are_capped(tmp_path):
    run = _hand_run(tmp_path, n_prompts=4)
    records = json.loads("[" + ",".join((run / "iter1" / "score" / "shard-00000.jsonl").read_text().splitlines()) + "]")
    records[0]["response"] = "z" * (MAX_TEXT_CHARS + 100)
    write_jsonl(run / "iter1" / "score" / "shard-00000.jsonl", records)
    append_results(run / "results.json", [
        {"model": m, "iteration": t, "lang": "es", "judge": "fake", "n": 30, "wr": wr, "wr_se": 4.0, "lc": 40.0,
         "lc_method": None, "fidelity": 0.9, "mean_len": 10.0} for m, t, wr in (("M0", 0, 50.0), ("M1", 1, 0.0))])
    first = write_html_report(run).read_bytes()
    assert write_html_report(run).read_bytes() == first
    assert b"more characters not embedded" in first and b"z" * (MAX_TEXT_CHARS + 1) not in first
    overview = page_data(run)["overview"]
    figures = [b for b in overview if b["kind"] == "figure"]
    assert figures and all(b["src"].startswith("data:image/png;base64,") for b in figures)
    wr_png = next(b for b in figures if b["name"] == "wr_by_iteration.fake.png")
    write_report(run)  # report.md's PNG and the page's figure: the same bytes
    assert base64.b64decode(wr_png["src"].split(",", 1)[1]) == (run / "wr_by_iteration.fake.png").read_bytes()


def test_rows_of_an_unknown_kind_get_a_generic_table(tmp_path, monkeypatch):
    from icr import report

    rows = [{"kind": "novel_bench", "model": "M1", "lang": "es", "score": 7.25, "turns": [1, 2]}]
    monkeypatch.setattr(report, "read_results", lambda path: rows)
    blocks, _ = report.report_blocks(tmp_path)
    table = next(b for b in blocks if b["kind"] == "table")
    assert table["header"] == ["model", "lang", "score", "turns"] and table["rows"] == [["M1", "es", "7.25", "[1, 2]"]]
    assert any(b.get("text") == "Results of kind `novel_bench`" for b in page_data(tmp_path)["overview"])


# --- the page in a browser ------------------------------------------------------------------------

class Browser:
    """Headless Chromium on 127.0.0.1 (a random port), driven over the DevTools protocol."""

    def __init__(self, profile: Path, timeout: float = 30.0):
        import websocket

        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--hide-scrollbars", "--window-size=1366,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=1366, height=900, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, path: Path, timeout: float = 30.0):
        self.call("Page.navigate", url=path.resolve().as_uri())
        deadline = time.monotonic() + timeout
        while self.js("document.readyState === 'complete' && document.body && document.body.dataset.ready") != "1":
            assert time.monotonic() < deadline, "the page did not finish rendering"
            time.sleep(0.1)

    def screenshot(self, path: Path):
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        reason = "chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("ICR_REQUIRE_CHROMIUM") == "1":
            pytest.fail(reason + " and ICR_REQUIRE_CHROMIUM=1")
        pytest.skip(reason)
    pytest.importorskip("websocket", reason="websocket-client (the dev extra) drives chromium's DevTools protocol")
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """configs/tiny.yaml with evaluation, reward agreement and a random-pairs control, through `icr run`."""
    import contextlib
    import io

    from icr.cli import main

    root = tmp_path_factory.mktemp("runs")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["run", str(REPO / "configs" / "tiny.yaml"), "--set", f"run_root={root}",
                     "--set", "evaluation.enabled=true", "--set", "evaluation.judge=fake",
                     "--set", "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl",
                     "--set", "evaluation.max_new_tokens=16", "--set", "evaluation.reward_agreement=true",
                     "--set", "controls=[{label: random-pairs, overrides: {pairs: {selection: random}}}]"])
    assert code == 0
    # `icr run` (and so `make demo`) ends with the page's path
    assert printed.getvalue().splitlines()[-1] == f"icr: browse the run: {root / 'tiny' / 'report.html'}"
    return root / "tiny"


def _select(b: Browser, element_id: str, value: str):
    b.js(f"(() => {{ const s = document.getElementById({json.dumps(element_id)}); s.value = {json.dumps(value)}; "
         "s.dispatchEvent(new Event(s.tagName === 'INPUT' ? 'input' : 'change')); })()")


def _cards(b: Browser, list_id: str) -> list[str]:
    return b.js(f"[...document.querySelectorAll('#{list_id} article > .card-head')].map(m => m.textContent)")


@pytest.mark.slow
def test_tiny_run_page_in_chromium(tiny_run, browser, tmp_path):
    page = tiny_run / "report.html"
    assert page.is_file() and page.stat().st_size < 2_000_000
    browser.open(page)
    headings = browser.js("[...document.querySelectorAll('#tab-overview h2')].map(h => h.textContent)")
    assert "Win rates against the reference — judge `fake`" in headings and "Reward agreement with the judge" in headings
    assert browser.js("[...document.images].every(i => i.complete && i.naturalWidth > 300)")
    browser.js("document.querySelector('nav button[data-tab=pairs]').click()")
    shot = Path(os.environ.get("ICR_REPORT_SCREENSHOT", tmp_path / "pairs.png"))
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert browser.js("document.getElementById('tab-pairs').hidden") is False
    for element_id, value in (("pair-run", "ICR"), ("pair-iteration", "2"), ("pair-lang", "es")):
        _select(browser, element_id, value)
    cards = _cards(browser, "pair-list")
    assert len(cards) == 12 and all(c.startswith("ICR · iteration 2 · es · prompt") for c in cards)
    assert browser.js("document.getElementById('pair-count').textContent").startswith(
        "12 prompts match. Embedded in this page: 12 of 12 prompts")
    data = page_data(tiny_run)["pairs"]["prompts"]
    disagreeing = [p["id"] for p in data if (p["run"], p["iteration"], p["lang"], p["agreement"]) == ("ICR", 2, "es", "disagrees")]
    _select(browser, "pair-agreement", "disagrees")
    cards = _cards(browser, "pair-list")
    assert [c.split("prompt ")[1].split(" ·")[0] for c in cards] == disagreeing
    assert all(c.endswith("judge disagrees") for c in cards)
    _select(browser, "pair-agreement", "")
    _select(browser, "pair-text", "tiny-0005")
    assert [c.split(" · ")[3] for c in _cards(browser, "pair-list")] == ["prompt tiny-0005"]
    gx = browser.js("[...document.querySelectorAll('#pair-list article .two .box pre')][1].textContent")
    assert gx.startswith("Please answer the following instruction using only Spanish") and "(#5)" in gx
    browser.js("document.querySelector('nav button[data-tab=mtbench]').click()")  # a run without MT-Bench
    assert browser.js("document.getElementById('mt-count').textContent").startswith("No MT-Bench answers in this run")
    assert browser.js("document.querySelectorAll('#mt-list article').length") == 0


@pytest.mark.slow
def test_html_in_answers_is_shown_as_text_and_model_filters_work(tiny_run, browser, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model", "checkpoint*", "*.safetensors"))
    outputs_path = run / "eval" / "M2" / "es" / "model_outputs.json"
    outputs = json.loads(outputs_path.read_text())
    outputs[2]["output"] = HOSTILE
    outputs_path.write_text(json.dumps(outputs))
    judgements_path = run / "eval" / "M2" / "es" / "judgements.fake.json"
    judgements = json.loads(judgements_path.read_text())
    judgements[2]["preference"] = 0.0  # M2 lost this prompt; M0 won it (the fake judge: all won)
    judgements_path.write_text(json.dumps(judgements))
    shard = run / "iter1" / "score" / "shard-00000.jsonl"
    lines = shard.read_text().splitlines()
    first = json.loads(lines[0])
    first["response"] = HOSTILE
    shard.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    add_mt_bench(run, models=("M0", "M1"), langs=("en", "es"))  # M1's turn-1 answer to question 102: HOSTILE
    write_html_report(run)
    browser.open(run / "report.html")
    assert browser.js("window.__pwned === undefined && document.querySelectorAll('main script, main img:not(.figure), main b').length === 0")
    browser.js("document.querySelector('nav button[data-tab=evaluation]').click()")
    for element_id, value in (("eval-model-a", "M2"), ("eval-outcome-a", "lost"), ("eval-model-b", "M0"),
                              ("eval-outcome-b", "won")):
        _select(browser, element_id, value)
    assert _cards(browser, "eval-list") == [f"es · prompt {outputs[2]['id']}"]
    shown = browser.js("[...document.querySelectorAll('#eval-list pre')].map(p => p.textContent)")
    assert HOSTILE in shown
    browser.js("document.querySelector('nav button[data-tab=pairs]').click()")
    _select(browser, "pair-text", "window.__pwned = 1")
    texts = browser.js("[...document.querySelectorAll('#pair-list pre')].map(p => p.textContent)")
    assert HOSTILE in texts and browser.js("window.__pwned === undefined")
    _select(browser, "eval-outcome-a", "won")  # won by both: every other prompt (the fake judge prefers any answer)
    assert browser.js("document.getElementById('eval-count').textContent").startswith("17 prompts match.")
    _mt_bench_view_in_chromium(browser)


def _mt_bench_view_in_chromium(browser: Browser):
    """The MT-Bench view of the page opened above (add_mt_bench: M0 graded 4, M1 7; M0's answers to
    question 103 refused by the judge server, M1's Spanish answers to 104 without a verdict)."""
    browser.js("document.querySelector('nav button[data-tab=mtbench]').click()")
    assert browser.js("document.getElementById('tab-mtbench').hidden") is False
    assert browser.js("document.getElementById('mt-count').textContent").startswith(
        "8 questions match. Embedded in this page: 8 of 8 MT-Bench questions")
    grades = browser.js("[...document.querySelectorAll('#mt-list .mt-row')].map(r => "
                        "[r.cells[0].textContent, r.cells[1].textContent])")
    assert len(grades) == 8 * 2 * 2 and {g for m, g in grades if m == "M1"} >= {"7.0"}
    refused = "missing: the judge server refused the request (413: prompt too long for the judge)"
    assert {g for m, g in grades if m == "M0"} == {"4.0", refused}
    _select(browser, "mt-model-a", "M0")  # grade of M0 below M1's (on either turn): both graded
    _select(browser, "mt-model-b", "M1")
    assert _cards(browser, "mt-list") == ["en · question 101 · writing", "en · question 102 · math",
                                          "en · question 104 · humanities", "es · question 101 · writing",
                                          "es · question 102 · math"]
    for element_id, value in (("mt-lang", "es"), ("mt-category", "math"), ("mt-turn", "1")):
        _select(browser, element_id, value)
    assert _cards(browser, "mt-list") == ["es · question 102 · math"]
    assert browser.js("[...document.querySelectorAll('#mt-list .mt-turn h4')].map(h => h.textContent)") == [
        "Turn 1: user", "Reference (shown to the judge)"]
    answers = browser.js("[...document.querySelectorAll('#mt-list .mt-row pre')].map(p => p.textContent)")
    assert f"M1 says {HOSTILE}" in answers and browser.js("window.__pwned === undefined")
    _select(browser, "mt-model-b", "")
    _select(browser, "mt-category", "humanities")
    _select(browser, "mt-model", "M1")
    cells = browser.js("[...document.querySelectorAll('#mt-list .mt-grade')].map(c => c.textContent)")
    assert cells == ["missing: the judge's reply had no verdict [[1-10]] (after every retry)"]


def test_wr_plot_data_has_errors_controls_and_the_lc_rule():
    from icr.report import lc_meaningful, wr_series

    def r(model, t, lang, wr, se, lc):
        return {"model": model, "iteration": t, "lang": lang, "wr": wr, "wr_se": se, "lc": lc}

    rows = [r("M0", 0, "es", 40.0, 3.0, 100.0), r("M0", 0, "de", 60.0, 4.0, 0.0), r("M1", 1, "es", 50.0, 3.0, 45.0),
            r("M1", 1, "de", 70.0, 4.0, 55.0), r("M1-random-pairs", 1, "es", 30.0, 3.0, 100.0),
            r("M1-random-pairs", 1, "de", 50.0, 4.0, 100.0)]
    wr = wr_series(rows)
    assert wr[("ICR", "es")] == [(0, 40.0, 3.0), (1, 50.0, 3.0)]
    assert wr[("random-pairs", "es")] == [(0, 40.0, 3.0), (1, 30.0, 3.0)]  # a control's line starts at M0
    assert wr[("ICR", "avg")][1] == pytest.approx((1, 60.0, 2.5))  # SE: sqrt(3^2 + 4^2) / 2
    assert wr_series(rows, "lc")[("ICR", "es")] == [(1, 45.0, 0.0)]  # LC at 0 / 100 left out
    assert not lc_meaningful(rows)  # 2 of 6 LC values inside (0.5, 99.5): no LC panel
    assert lc_meaningful(rows[:4]) and not lc_meaningful([r("M0", 0, "es", 1.0, 1.0, None)])
