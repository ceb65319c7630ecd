"""``serve`` and the static ``dashboard`` driven in headless Chromium on the demo harvests.

Every number and token a test reads off a page is compared with what a fresh ``HarvestRepo``
(and the label store) returns, computed here independently of the viewer's code."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from spd_host.autointerp.store import LabelStore
from spd_host.harvest import HarvestRepo

pytestmark = pytest.mark.slow


def fresh_repo(viewer: Any, n: int) -> HarvestRepo:
    return HarvestRepo(viewer.sources[n].repo.path)


def shoot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


def table_rows(driver: Any) -> list[Any]:
    return driver.find_elements(By.CSS_SELECTOR, "#index-table tr.row")


def count_text(driver: Any) -> int:
    return int(driver.find_element(By.ID, "count").text.split()[0])


def wait_for(driver: Any, cond: Any) -> None:
    WebDriverWait(driver, 20).until(lambda d: cond(d))


def check_examples(driver: Any, section: str, examples: list[Any], tok: Any) -> int:
    """The section's example windows equal ``examples``: token text, firing marks, centre and
    every activation type's value (hover data) for every token."""
    divs = driver.find_elements(By.CSS_SELECTOR, f"#{section} .example")
    assert len(divs) == len(examples)
    checked = 0
    for div, ex in zip(divs, examples, strict=True):
        spans = div.find_elements(By.CSS_SELECTOR, "span.tok")
        assert len(spans) == len(ex.tokens)
        for i, span in enumerate(spans):
            assert span.get_attribute("data-id") == str(ex.tokens[i])
            assert span.get_attribute("textContent") == tok.decode([ex.tokens[i]])
            cls = span.get_attribute("class").split()
            assert ("fired" in cls) == bool(ex.firings[i])
            assert ("centre" in cls) == (i == ex.centre)
            title = span.get_attribute("title")  # the no-JavaScript hover
            assert title.startswith(tok.decode([ex.tokens[i]]))
            assert all(f"{t} = " in title for t in ex.activations)
            acts = json.loads(span.get_attribute("data-acts"))
            assert set(acts) == set(ex.activations)
            for t, vals in ex.activations.items():
                assert acts[t] == pytest.approx(vals[i], rel=1e-6, abs=1e-9)
            checked += 1
    return checked


def test_index_sort_filter_search(
    home: Path, server: str, browser: Any, viewer: Any, tmp_path: Path
) -> None:
    repo = fresh_repo(viewer, 0)
    summary = repo.summary()
    browser.get(f"{server}/d/0/")
    shoot(browser, tmp_path, "index")
    assert count_text(browser) == len(summary)
    # default order: density, descending (ties: later components first, the same direction)
    ref = sorted(range(len(summary)), key=lambda g: (-summary[g].density, -g))[:50]
    assert [r.get_attribute("data-key") for r in table_rows(browser)] == [
        summary[g].key for g in ref
    ]
    # click the density header: ascending
    browser.find_element(By.CSS_SELECTOR, 'a.sort[data-col="density"]').click()
    wait_for(browser, lambda d: "desc=0" in d.current_url)
    ref = sorted(range(len(summary)), key=lambda g: (summary[g].density, g))[:50]
    assert [r.get_attribute("data-key") for r in table_rows(browser)] == [
        summary[g].key for g in ref
    ]
    # filter by site and a density range
    Select(browser.find_element(By.ID, "site")).select_by_visible_text("layer_1")
    browser.find_element(By.ID, "dmin").send_keys("0.001")
    browser.find_element(By.ID, "dmax").send_keys("0.05")
    browser.find_element(By.ID, "apply").click()
    wait_for(browser, lambda d: "site=layer_1" in d.current_url)
    expect = [s for s in summary if s.site == "layer_1" and 0.001 <= s.density <= 0.05]
    assert count_text(browser) == len(expect)
    for r in table_rows(browser):
        assert r.get_attribute("data-key").startswith("layer_1:")
        assert 0.001 <= float(r.get_attribute("data-density")) <= 0.05
    shoot(browser, tmp_path, "index-filtered")
    # full-text search over labels: a word of a stored label finds exactly the labels with it
    with LabelStore(viewer.sources[0].labels_path) as store:
        labels = {r.component_key: r.label for r in store.records(status="ok")}
    key, label = sorted(labels.items())[0]
    word = next(w for w in label.replace("'", " ").replace("/", " ").split() if w.isalpha())
    browser.get(f"{server}/d/0/?q={quote(word)}&per_page=1000")
    found = {r.get_attribute("data-key") for r in table_rows(browser)}
    assert key in found
    # every hit has the word (as a prefix of a token) in its label or its top tokens
    for k in found:
        row = viewer.indexes[0].row(k)
        text = f"{row['label'] or ''} {row['input_tokens'] or ''} {row['output_tokens'] or ''}"
        words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
        assert any(w.startswith(word.lower()) for w in words), (k, text)
    # score filter: only components scored by detection at or above the threshold
    browser.get(f"{server}/d/0/?score=detection&smin=0.5&per_page=1000")
    scored = {r.get_attribute("data-key") for r in table_rows(browser)}
    from spd_host.evals import load_result
    from spd_host.evals.llm.suites import JudgeResult

    res = load_result(viewer.sources[0].evals_dir / "detection.json", JudgeResult)
    assert scored == {c.key for c in res.components if c.score is not None and c.score >= 0.5}


def test_component_page_matches_harvest_repo(
    home: Path, server: str, browser: Any, viewer: Any, tmp_path: Path
) -> None:
    for n, key in ((0, None), (1, None)):
        repo = fresh_repo(viewer, n)
        summary = repo.summary()
        key = max(summary, key=lambda s: (s.firing_count, -summary.index(s))).key
        d = repo.component(key)
        browser.get(f"{server}/d/{n}/c/{key}")
        assert browser.find_element(By.ID, "ckey").text.startswith(key)
        assert browser.find_element(By.ID, "firing-count").text == str(d.firing_count)
        assert float(browser.find_element(By.ID, "density").text) == pytest.approx(
            d.density, rel=1e-5
        )
        for t in repo.layout.act_types:
            cell = browser.find_element(By.CSS_SELECTOR, f'#stats td[data-type="{t}"]')
            mx = float(cell.find_element(By.CLASS_NAME, "max-firing").text)
            assert mx == pytest.approx(d.max_firing[t], rel=2e-3)
        checked = check_examples(browser, "top-examples", d.top_examples, repo.tokenizer)
        assert checked > 0
        # the quantile section holds exactly the reservoir sample, highest score first
        spans = browser.find_elements(By.CSS_SELECTOR, "#quantiles .example")
        scores = [float(s.get_attribute("data-score")) for s in spans]
        assert sorted(scores, reverse=True) == scores
        assert sorted(scores) == pytest.approx(sorted(e.score for e in d.reservoir_examples))
        # the input-token PMI column equals token_stats
        ts = repo.token_stats(key, "input", top=10)
        cells = browser.find_elements(By.CSS_SELECTOR, "#input-tokens table tr td.tokcell")
        shown = [json.loads(c.text) for c in cells[::3]]
        assert shown == [repo.tokenizer.decode([s.token]) for s in ts.top_pmi]
        # the histogram chart was drawn by the vendored Chart.js (no network)
        assert browser.execute_script("return typeof Chart") == "function"
        # the SPD page shows both activation types for every token (checked above via data-acts)
        if n == 1:
            assert set(repo.layout.act_types) == {"causal_importance", "component_activation"}
        shoot(browser, tmp_path, f"component-{n}")


def test_correlated_link_and_keyboard(
    home: Path, server: str, browser: Any, viewer: Any, tmp_path: Path
) -> None:
    repo = fresh_repo(viewer, 0)
    summary = repo.summary()
    key = next(
        s.key for s in sorted(summary, key=lambda s: -s.firing_count) if repo.correlated(s.key)
    )
    expect = repo.correlated(key, metric="jaccard", top=12)
    browser.get(f"{server}/d/0/c/{key}")
    links = browser.find_elements(By.CSS_SELECTOR, "#correlated a.corr")
    assert [a.text for a in links] == [k for k, _ in expect]
    cells = browser.find_elements(By.CSS_SELECTOR, "#correlated tr td:nth-child(2)")
    assert float(cells[0].text) == pytest.approx(expect[0][1], abs=1e-3)
    links[0].click()
    wait_for(browser, lambda d: d.find_element(By.ID, "ckey").text.startswith(expect[0][0]))
    shoot(browser, tmp_path, "correlated-target")
    # keyboard: → goes to the next component in harvest order, ← back
    here = expect[0][0]
    g = repo.layout.index(here)
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    nxt = repo.layout.key(g + 1)
    wait_for(browser, lambda d: d.find_element(By.ID, "ckey").text.startswith(nxt))
    browser.find_element(By.TAG_NAME, "body").send_keys("k")
    wait_for(browser, lambda d: d.find_element(By.ID, "ckey").text.startswith(here))


def test_compare_view(home: Path, server: str, browser: Any, viewer: Any, tmp_path: Path) -> None:
    browser.get(f"{server}/compare")
    shoot(browser, tmp_path, "compare")
    bases = browser.find_element(By.ID, "base-models").text
    for s in viewer.sources:
        assert f"{s.decomposition_id} → {s.adapter.base_model_name}" in bases
    assert not browser.find_elements(By.ID, "base-model-warning")  # both demos share a model
    table = browser.find_element(By.CSS_SELECTOR, 'table.eval-table[data-suite="detection"]')
    assert "transcoder:demo" in table.text
    heads = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#compare-matches h3")]
    # transcoder layer_i reads 'i.mlp_in'; SPD's 'i.mlp.up' reads the same hook point
    assert any("layer_0" in h and "0.mlp.up" in h for h in heads), heads
    a = browser.find_elements(By.CSS_SELECTOR, "a.match-a")[0]
    b_links = browser.find_elements(By.CSS_SELECTOR, "a.match-b")
    assert a.text and b_links
    # the first pair really shares top input tokens (recomputed from token_stats)
    ra, rb = fresh_repo(viewer, 0), fresh_repo(viewer, 1)
    ta = {s.token for s in ra.token_stats(a.text, "input", top=5).top_pmi}
    tb = {s.token for s in rb.token_stats(b_links[0].text, "input", top=5).top_pmi}
    jac = float(
        browser.find_elements(By.CSS_SELECTOR, "table.match-table tr td:nth-child(5)")[0].text
    )
    assert jac == pytest.approx(len(ta & tb) / len(ta | tb), abs=1e-3)
    target = b_links[0].text
    b_links[0].click()
    wait_for(browser, lambda d: d.find_element(By.ID, "ckey").text.startswith(target))


def test_static_dashboard_from_file_url(
    home: Path, browser: Any, viewer: Any, tmp_path: Path
) -> None:
    from spd_host.viewer.static_site import page_name, write_dashboard

    out = tmp_path / "dash"
    keys = write_dashboard(viewer.sources[0], out, top=20)
    repo = fresh_repo(viewer, 0)
    summary = {s.key: s for s in repo.summary()}
    alive = sorted((s for s in summary.values() if s.firing_count), key=lambda s: -s.density)
    assert keys == [
        s.key for s in sorted(alive, key=lambda s: (-s.density, repo.layout.index(s.key)))[:20]
    ]
    for p in out.rglob("*.html"):
        assert "http://" not in p.read_text() and "https://" not in p.read_text(), p
    browser.get((out / "index.html").as_uri())
    wait_for(browser, lambda d: len(table_rows(d)) == 20)
    shoot(browser, tmp_path, "static-index")
    # client-side sort ascending by density
    browser.find_element(By.CSS_SELECTOR, 'a.sort[data-col="density"]').click()
    dens = [float(r.get_attribute("data-density")) for r in table_rows(browser)]
    assert dens == sorted(dens)
    # client-side site filter
    site = summary[keys[0]].site
    Select(browser.find_element(By.ID, "site")).select_by_visible_text(site)
    browser.find_element(By.ID, "apply").click()
    assert count_text(browser) == sum(1 for k in keys if summary[k].site == site)
    # open a component page from the index (file:// link) and check its tokens
    key = table_rows(browser)[0].get_attribute("data-key")
    table_rows(browser)[0].find_element(By.CSS_SELECTOR, "a.ckey").click()
    wait_for(browser, lambda d: d.current_url.endswith(page_name(key)))
    d = repo.component(key)
    check_examples(browser, "top-examples", d.top_examples, repo.tokenizer)
    assert browser.execute_script("return typeof Chart") == "function"
    assert not math.isnan(float(browser.find_element(By.ID, "density").text))
    shoot(browser, tmp_path, "static-component")
