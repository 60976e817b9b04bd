"""The dashboard: a static site built from the history, opened from disk or served as GitHub Pages, offline.

    <out>/index.html                    regressions first (each links to its combo), then per GPU class a table of
                                        combos: newest outcome, it/s, peak VRAM, MS-SSIM, verdict against history
    <out>/<class>/<combo>.html          trend charts of it/s, peak VRAM (GiB) and MS-SSIM over the runs (hover: run,
                                        commit, date, machine), every run's verdict, each regression's first bad
                                        commit, the newest reference | candidate | difference grid
    <out>/<class>/report.html           the newest run's PR summary and decision report (`publish.write_report`)
    <out>/<class>/card.html             the class's detection card, where docs/ has one
    <out>/plotly.min.js                 the charting library, once, so every page works without a network

Charts are plotly's (its JavaScript is written beside the pages). A regression here is a run whose combo the
history rule (`judging.compare`) flags against the window of runs before it; once the slower runs fill the window,
later runs read "no change", so the flagged run is the regression's first bad commit and the run before it in the
series its last good one.
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fluxgate.judging import compare
from fluxgate.showing import decision, publish
from fluxgate.showing.figures import TREND_PANELS
from fluxgate.showing.text import number
from fluxgate.storing.record import REMEASURE, Record
from fluxgate.storing.store import HistoryStore, file_name

CHARTS = [(metric, label) for metric, label, _ in TREND_PANELS]  # the PR summary's trend panels, as plotly charts
_STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.regression{color:#b00;font-weight:bold}"
          "img{max-width:100%}")


@dataclass(frozen=True)
class Point:
    """One run of one combo: its record and its verdict against the runs before it."""

    record: Record
    verdict: str
    message: str

    @property
    def commit(self) -> str:
        commit = str(self.record.env.get("git_commit") or "?")[:10]
        return commit + ("+dirty" if self.record.env.get("git_dirty") else "")

    @property
    def machine(self) -> str:
        return f"{self.record.env.get('device_name', '?')} {self.record.gpu_uuid[:12]}".strip()

    @property
    def date(self) -> str:
        return str(self.record.recorded or self.record.run_id or "")[:19]


def series(records: list[Record]) -> dict[tuple[str, str], list[Point]]:
    """(GPU class, combo) -> its runs, oldest first, each judged against the window of runs before it."""
    runs = sorted({r.run_id for r in records if r.run_id})
    verdicts: dict[tuple[str, str], compare.Verdict] = {}
    for run_id in runs:
        try:
            judged = compare.compare_run(records, run_id)
        except ValueError:  # a run holding only re-measurements
            continue
        verdicts.update({(run_id, v.combo): v for v in judged})
    out: dict[tuple[str, str], list[Point]] = {}
    for record in sorted((r for r in records if r.outcome != REMEASURE), key=lambda r: (str(r.run_id), r.combo)):
        verdict = verdicts.get((record.run_id, record.combo))
        outcome = verdict.outcome if verdict else compare.NOT_COMPARABLE
        out.setdefault((str(record.gpu_class), record.combo), []).append(
            Point(record, outcome, verdict.message if verdict else ""))
    return out


def _page(title: str, body: str, depth: int) -> str:
    up = "../" * depth
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style><script src='{up}plotly.min.js'></script></head><body>"
            f"<p><a href='{up}index.html'>fluxgate dashboard</a></p><h1>{html.escape(title)}</h1>{body}</body></html>")


def _chart(points: list[Point], metric: str, title: str) -> str:
    import plotly.graph_objects as go

    shown = [p for p in points if getattr(p.record.metrics, metric) is not None]
    hover = [f"run {p.record.run_id}<br>commit {p.commit}<br>{p.date}<br>{p.machine}<br>{p.verdict}" for p in shown]
    figure = go.Figure(go.Scatter(x=[p.date for p in shown], y=[getattr(p.record.metrics, metric) for p in shown],
                                  mode="lines+markers", text=hover, hoverinfo="text+y",
                                  marker={"color": ["#b00" if p.verdict == compare.REGRESSION else "#1f77b4"
                                                    for p in shown]}))
    figure.update_layout(title=title, height=280, margin={"l": 50, "r": 20, "t": 40, "b": 40})
    return figure.to_html(full_html=False, include_plotlyjs=False)


def regressions(points: list[Point]) -> list[tuple[Point, Point | None]]:
    """Each regression of a combo's series: (first bad run, the run before it, None when it is the first)."""
    return [(p, points[i - 1] if i else None) for i, p in enumerate(points) if p.verdict == compare.REGRESSION]


def _combo_page(gpu_class: str, combo: str, points: list[Point], grid: Path | None) -> str:
    body = "".join(_chart(points, metric, title) for metric, title in CHARTS)
    found = regressions(points)
    if found:
        items = "".join(f"<li class='regression' id='regression-{i}'>first bad commit {bad.commit} (run "
                        f"{bad.record.run_id}, {bad.date}, {html.escape(bad.machine)}); last good "
                        f"{good.commit if good else '-'}: {html.escape(bad.message)}</li>"
                        for i, (bad, good) in enumerate(found))
        body = f"<h2>Regressions</h2><ul>{items}</ul>" + body
    rows = "".join(f"<tr><td>{p.date}</td><td>{p.record.run_id}</td><td>{p.commit}</td><td>{html.escape(p.machine)}"
                   f"</td><td>{p.record.outcome}</td><td class='{p.verdict.replace(' ', '-')}'>{p.verdict}</td>"
                   f"<td>{html.escape(p.message)}</td></tr>" for p in reversed(points))
    body += ("<h2>Runs</h2><table><tr><th>date</th><th>run</th><th>commit</th><th>machine</th><th>outcome</th>"
             f"<th>verdict vs the runs before</th><th>message</th></tr>{rows}</table>")
    if grid is not None:
        body += f"<h2>Newest image: reference | candidate | difference</h2><img src='{grid.name}' alt='grid'>"
    return _page(f"{combo} on {gpu_class}", body, depth=1)


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").render(text)


def _class_extras(store: HistoryStore, gpu_class: str, newest: str, folder: Path, baselines_dir: Path,
                  decision_settings: decision.Settings | None) -> dict[str, Path]:
    """The class's report page (the newest run's summary and decision) and card page; grids by combo file name."""
    written = publish.write_report(store, folder / "report", baselines_dir, run_id=newest,
                                   decision_settings=decision_settings)
    parts = [_markdown(path.read_text()) for path in written if path.suffix == ".md"]
    (folder / "report.html").write_text(_page(f"newest run on {gpu_class}", "".join(parts), depth=1))
    card = baselines_dir.parent / "docs" / f"detection-card-{gpu_class}.md"
    if card.is_file():
        (folder / "card.html").write_text(_page(f"detection card: {gpu_class}", _markdown(card.read_text()), depth=1))
    grids = {}
    for path in written:
        if path.parent.name == "grids":
            shutil.copy(path, folder / path.name)
            grids[path.name] = folder / path.name
    return grids


def build(store: HistoryStore, out: Path, baselines_dir: Path, decision_settings: decision.Settings | None = None,
          progress: Callable[[Path], None] | None = None) -> Path:
    """Write the site for every record of `store` into `out` (cleared of an earlier site first); returns index.html.
    Raises publish.PublishError when the store holds no readable record, OSError when a file cannot be written."""
    import plotly.offline

    records = store.load()
    if not records:
        raise publish.PublishError(f"{store}: no readable history records to build a dashboard from")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "plotly.min.js").write_text(plotly.offline.get_plotlyjs())
    by_combo = series(records)
    sections, flagged = [], []
    for gpu_class in sorted({cls for cls, _ in by_combo}):
        folder = out / gpu_class
        folder.mkdir()
        newest = max(r.run_id for r in records if str(r.gpu_class) == gpu_class)
        grids = _class_extras(store, gpu_class, newest, folder, baselines_dir, decision_settings)
        rows = []
        for (cls, combo), points in sorted(by_combo.items()):
            if cls != gpu_class:
                continue
            page = folder / f"{file_name(combo)}.html"
            page.write_text(_combo_page(gpu_class, combo, points, grids.get(f"{file_name(combo)}.png")))
            if progress:
                progress(page)
            link = f"{gpu_class}/{page.name}"
            flagged += [(gpu_class, combo, link, i, bad) for i, (bad, _) in enumerate(regressions(points))]
            m, last = points[-1].record.metrics, points[-1]
            rows.append(f"<tr><td><a href='{link}'>{combo}</a></td><td>{last.record.outcome}</td>"
                        f"<td>{number(m.it_s, '.3f')}</td><td>{number(m.peak_mem_gib, '.2f')}</td>"
                        f"<td>{number(m.ms_ssim, '.4f')}</td><td>{last.verdict}</td><td>{len(points)}</td></tr>")
        extras = f"<a href='{gpu_class}/report.html'>newest run: summary and decision</a>"
        if (folder / "card.html").is_file():
            extras += f" | <a href='{gpu_class}/card.html'>detection card</a>"
        sections.append(f"<h2>{gpu_class}</h2><p>{extras}</p><table><tr><th>combo</th><th>newest outcome</th>"
                        "<th>it/s</th><th>peak GiB</th><th>MS-SSIM</th><th>verdict</th><th>runs</th></tr>"
                        + "".join(rows) + "</table>")
    found = "".join(f"<li class='regression'><a href='{link}#regression-{i}'>{combo} on {cls}</a>: first bad commit "
                    f"{bad.commit}, {bad.date}</li>" for cls, combo, link, i, bad in flagged)
    head = (f"<h2>Regressions</h2><ul id='regressions'>{found}</ul>" if found
            else "<h2>Regressions</h2><p id='regressions'>none in this history</p>")
    runs = len({r.run_id for r in records})
    index = out / "index.html"
    index.write_text(_page("fluxgate dashboard", f"<p>{runs} runs, {len(records)} records.</p>{head}"
                           + "".join(sections), depth=0))
    return index
