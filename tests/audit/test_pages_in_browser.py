"""The pages people open, in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright; never `playwright install`) loads the audit report and the Great Expectations Data
Docs of a finished tiny run (fixture `finished_run`, conftest.py), and the app `kedro viz build`
writes. Each page must show its content, log no console error, raise no page error, and ask for
nothing outside this machine: every request that is not file://, data:, blob: or the local test
server is recorded and never fetched.

Known upstream gaps, named where they are handled: kedro-viz 12.5's static build (a Google Fonts
link, a missing `api/metadata`: tolerated exactly) and GX 1.24's Data Docs (CDN scripts: a strict
xfail that turns into a failure once the pages work offline).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import pytest

from fixtures_medmnist import kedro_env, make_project_copy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed: install it with `apt-get install chromium` to run the browser tests.",
)

LOCAL_SCHEMES = ("file", "data", "blob", "about")
LOCAL_HOSTS = ("127.0.0.1", "localhost")
# kedro-viz 12.5's own index.html links a Google Fonts stylesheet (Inter). Nothing is fetched:
# the test answers it with an empty stylesheet (the app falls back to the next font) and checks
# it is the only request that would have left the machine.
KEDRO_VIZ_FONT_CSS = "https://fonts.googleapis.com/css2?family=Inter"
# kedro-viz 12.5's app always fetches `api/metadata` (for its "Publish and share" dialog), a
# response of the `kedro viz run` server that `kedro viz build` does not write: on a static
# build it logs a 404 and "metadata fetch error". Upstream, not this project; the only console
# errors tolerated, matched exactly.
KEDRO_VIZ_STATIC_BUILD_ERRORS = (
    re.compile(r"Failed to load resource: the server responded with a status of 404 \(File not found\) \[/api/metadata\]"),
    re.compile(r"metadata fetch error: +SyntaxError: Unexpected token '<', \"<!DOCTYPE \"\.\.\. is not valid JSON \[/assets/index-[\w-]+\.js\]"),
)  # fmt: skip
KEDRO_VIZ_STATIC_BUILD_MISSING = (re.compile(r"http://127\.0\.0\.1:\d+/api/metadata: HTTP 404"),)


@dataclass
class Visit:
    page: object
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    def problems(self, tolerated_console_errors=(), tolerated_failed_requests=()) -> list[str]:
        console = [e for e in self.console_errors if not any(p.fullmatch(e) for p in tolerated_console_errors)]
        failed = [e for e in self.failed_requests if not any(p.fullmatch(e) for p in tolerated_failed_requests)]
        return (
            [f"console error: {e}" for e in console]
            + [f"page error: {e}" for e in self.page_errors]
            + [f"request failed: {e}" for e in failed]
        )

    def text(self) -> str:
        return self.page.evaluate("document.body.innerText")


def _is_local(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in LOCAL_SCHEMES or (parsed.scheme in ("http", "https") and parsed.hostname in LOCAL_HOSTS)


def _where(location: dict) -> str:
    url = location.get("url") or ""
    return f" [{urlparse(url).path}]" if url else ""


@contextlib.contextmanager
def _browse(url: str, stubs: dict[str, tuple[str, str]] | None = None) -> Iterator[Visit]:
    """Open `url` in a fresh headless Chromium; `stubs` maps a URL prefix that must not be
    fetched to the (content type, body) answered in its place. The browser is closed on exit."""
    from playwright.sync_api import sync_playwright

    stubs = stubs or {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            context = browser.new_context()
            page = context.new_page()
            visit = Visit(page)

            def route(request_route):
                request_url = request_route.request.url
                if _is_local(request_url):
                    request_route.continue_()
                    return
                visit.external_requests.append(request_url)
                stub = next((v for prefix, v in stubs.items() if request_url.startswith(prefix)), None)
                if stub is None:
                    request_route.abort("blockedbyclient")
                else:
                    request_route.fulfill(status=200, content_type=stub[0], body=stub[1])

            context.route("**/*", route)
            page.on("console", lambda m: m.type == "error" and visit.console_errors.append(f"{m.text}{_where(m.location)}"))
            page.on("pageerror", lambda e: visit.page_errors.append(f"{e.name}: {e.message}"))
            page.on(
                "requestfailed",
                lambda r: _is_local(r.url) and visit.failed_requests.append(f"{r.url}: {r.failure}"),
            )
            page.on("response", lambda r: r.status >= 400 and visit.failed_requests.append(f"{r.url}: HTTP {r.status}"))
            response = page.goto(url, wait_until="load")
            assert response is None or response.ok, f"{url}: HTTP {response.status}"
            page.wait_for_load_state("networkidle")
            yield visit
            page.wait_for_load_state("networkidle")  # whatever the checks triggered has finished too
        finally:
            browser.close()


def _visible_images(page) -> tuple[int, int]:
    """(images in the page, images decoded with a non-zero size)."""
    return page.evaluate(
        "() => { const imgs = [...document.images];"
        " return [imgs.length, imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length]; }"
    )


@pytest.mark.slow
def test_audit_report_opens_in_chromium(finished_run):
    report_file = finished_run["project"] / "data/08_reporting/audit/audit_report.html"
    report = json.loads(report_file.with_suffix(".json").read_text())
    with _browse(report_file.as_uri()) as visit:
        page = visit.page
        text = visit.text()
        assert page.title() == report["report"]["title"]
        assert page.locator("h1").first.inner_text() == report["report"]["title"]
        assert len(text) > 5000, text[:500]
        assert "Audit verdict" in text and "Research use only" in text
        assert report["general"]["mlflow_run_id"] in text
        for anchor in ("verdict", "general", "training_process", "data_gates", "validation_and_test", "model_card", "integrity"):
            assert page.locator(f"#{anchor}").is_visible(), anchor
        images, decoded = _visible_images(page)
        assert images >= 5 and decoded == images, f"{decoded} of {images} figures decoded"
    assert visit.external_requests == [] and visit.problems() == []


def _gate_sites(finished_run) -> tuple[Path, list[str]]:
    docs = finished_run["project"] / "data/08_reporting/data_docs"
    gates = sorted(p.parent.name for p in docs.glob("*/index.html"))
    assert gates == ["partition", "raw_data"], f"the raw-data and partition gates' sites in {docs}: {gates}"
    return docs, gates


@pytest.mark.slow
def test_data_docs_index_opens_in_chromium(finished_run):
    """The top page the gates write (validation/gate.py) links every gate's Data Docs site."""
    docs, gates = _gate_sites(finished_run)
    with _browse((docs / "index.html").as_uri()) as visit:
        page = visit.page
        assert page.title() == "fedmic data gates"
        assert page.locator("h1").inner_text() == "Data gates (Great Expectations Data Docs)"
        links = page.locator("li a")
        assert links.all_inner_texts() == gates
        for k, gate in enumerate(gates):
            assert links.nth(k).is_visible()
            assert links.nth(k).evaluate("a => a.href") == (docs / gate / "index.html").as_uri()
    assert visit.external_requests == [] and visit.problems() == []


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "Great Expectations 1.24's Data Docs pages load jQuery, Bootstrap, bootstrap-table, Vega and Font Awesome "
        "from public CDNs (16 requests a page, plus a logo from S3): offline every page logs 16 console errors, "
        "the gate index raises `ReferenceError: $ is not defined` and lists no validation result (its table is "
        "filled by bootstrap-table). Fix in validation/gate.py: a custom_views_directory whose page templates "
        "point at vendored local copies."
    ),
)
def test_data_docs_gate_sites_open_offline_in_chromium(finished_run):
    docs, gates = _gate_sites(finished_run)
    visits = {}
    for gate in gates:
        results = sorted((docs / gate / "validations").rglob("*.html"))
        assert len(results) == 2, f"{gate}: one validation result per suite of the gate, found {results}"
        with _browse((docs / gate / "index.html").as_uri()) as visit:
            assert visit.page.title() == "Data Docs created by Great Expectations"
            assert "Validation Results" in visit.text()
            listed = visit.page.evaluate(  # bootstrap-table draws one row per result, linked by data-href
                "() => [...document.querySelectorAll('tr[data-href]')]"
                ".map(row => new URL(row.dataset.href, document.baseURI).href).filter(h => h.includes('/validations/')).sort()"
            )
        visits[f"{gate}/index.html"] = (visit, listed == [r.as_uri() for r in results])
        for result in results:
            suite = result.relative_to(docs / gate / "validations").parts[0]
            with _browse(result.as_uri()) as visit:
                text = visit.text()  # the result tables are plain HTML: readable even unstyled
                assert "Expectation Validation Result" in text and f"Expectation Suite: {suite}" in text, text[:500]
                assert visit.page.locator("table tbody tr").count() >= 3
            visits[result.relative_to(docs).as_posix()] = (visit, True)
    # what needs the CDNs: nothing may leave the machine, and the gate index must list its results
    left = {page: sorted({urlparse(u).hostname for u in visit.external_requests}) for page, (visit, _) in visits.items()}
    assert not any(left.values()), f"requests leaving the machine, by page: {left}"
    problems = {page: visit.problems() for page, (visit, _) in visits.items() if visit.problems()}
    assert not problems, problems
    assert all(listed for _, listed in visits.values()), "a gate index does not link its validation results"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def _serve(folder: Path) -> Iterator[str]:
    """`folder` over http://127.0.0.1 on a free port (the app loads its JS as ES modules and
    fetches JSON, which file:// refuses); the server is shut down on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.slow
def test_kedro_viz_build_opens_in_chromium(tmp_path):
    project = make_project_copy(tmp_path / "project")  # never build into the checkout
    env = {**kedro_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["kedro", "viz", "build"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    build = project / "build"
    assert (build / "index.html").is_file(), sorted(p.name for p in project.iterdir())
    main = json.loads((build / "api/main").read_text())
    tasks = sorted(n["name"] for n in main["nodes"] if n["type"] == "task")
    datasets = [n for n in main["nodes"] if n["type"] == "data"]
    assert {"load_raw_dataset", "train_federated", "evaluate_federation"} <= set(tasks)

    with _serve(build) as root, _browse(root, stubs={KEDRO_VIZ_FONT_CSS: ("text/css", "")}) as visit:
        page = visit.page
        # the flowchart is laid out after load: wait until every node of the default pipeline is drawn
        page.wait_for_function(
            "([t, d]) => document.querySelectorAll('svg .pipeline-node--task').length === t"
            " && document.querySelectorAll('svg .pipeline-node--data').length === d",
            arg=[len(tasks), len(datasets)],
            timeout=60_000,
        )
        assert page.title() == "Kedro-Viz"
        text = visit.text()
        assert f"Kedro-Viz {version('kedro-viz')}" in text and "__default__" in text
        missing = [name for name in tasks if name not in text]
        assert not missing, f"nodes not listed in the sidebar: {missing}"
        assert page.locator("svg .pipeline-edge").count() >= len(tasks)
    assert [u for u in visit.external_requests if not u.startswith(KEDRO_VIZ_FONT_CSS)] == []
    assert visit.problems(KEDRO_VIZ_STATIC_BUILD_ERRORS, KEDRO_VIZ_STATIC_BUILD_MISSING) == []
