"""The dashboard: a static site built from the history, opened from disk or served as GitHub Pages, offline.

    <out>/index.html                    regressions first (each links to its combo), then per GPU class a table of
                                        combos: newest outcome, it/s, peak VRAM, MS-SSIM, verdict against history
    <out>/<class>/<combo>.html          trend charts of it/s, peak VRAM (GiB) and MS-SSIM over the runs (hover: run,
                                        commit, date, machine), every run's verdict, each regression's first bad
                                        commit, the newest reference | candidate | difference grid
    <out>/<class>/report.html           the newest run's PR summary and decision report (`publish.write_report`)
    <out>/<class>/card.html             the class's detection card, where docs/ has one
    <out>/plotly.min.js                 the charting library, once, so every page works without a network
    <out>/.fluxgate-dashboard           the files this build wrote (`showing.site`): the next build removes only them

Charts are plotly's (its JavaScript is written beside the pages). Every verdict shown is the one the gate stored on
the record (`storing.verdicts.shown`: against history with the policy the gate used, or an A/B run's); the
dashboard never judges again, and a record without one reads "not recorded". A regression here is a run the gate
flagged against the window of runs before it; once the slower runs fill the window, later runs read "no change", so
the flagged run is the regression's first bad commit and the run before it in the series its last good one.

Every value from a record is HTML-escaped; markdown (the report, the card) is rendered with raw HTML off and record
text escaped; file names from records are checked names (`storing.names`) and every path is kept inside `--out`.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fluxgate.showing import decision, publish
from fluxgate.showing.figures import TREND_PANELS
from fluxgate.showing.site import Site
from fluxgate.showing.text import number
from fluxgate.storing.record import REMEASURE, Record
from fluxgate.storing.store import HistoryStore, file_name
from fluxgate.storing.verdicts import NOT_RECORDED, REGRESSION, shown

CHARTS = [(metric, label) for metric, label, _ in TREND_PANELS]  # the PR summary's trend panels, as plotly charts
_STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.regression{color:#b00;font-weight:bold}"
          "img{max-width:100%}")


def esc(value) -> str:
    """A value from a record as HTML text or an attribute value (quotes escaped too)."""
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class Point:
    """One run of one combo: its record and the verdict the gate stored on it."""

    record: Record

    @property
    def verdict(self) -> str:
        return shown(self.record) or NOT_RECORDED

    @property
    def message(self) -> str:
        verdict, ab = self.record.history_verdict, self.record.ab
        return verdict.message if verdict is not None else (ab.message if ab is not None else "")

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
    """(GPU class, combo) -> its runs, oldest first, each with the verdict its record stores."""
    out: dict[tuple[str, str], list[Point]] = {}
    for record in sorted((r for r in records if r.outcome != REMEASURE), key=lambda r: (str(r.run_id), r.combo)):
        out.setdefault((str(record.gpu_class), record.combo), []).append(Point(record))
    return out


def _page(title: str, body: str, depth: int) -> str:
    up = "../" * depth
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style><script src='{up}plotly.min.js'></script></head><body>"
            f"<p><a href='{up}index.html'>fluxgate dashboard</a></p><h1>{html.escape(title)}</h1>{body}</body></html>")


def _chart(points: list[Point], metric: str, title: str) -> str:
    import plotly.graph_objects as go

    shown = [p for p in points if getattr(p.record.metrics, metric) is not None]
    hover = ["<br>".join(esc(part) for part in (f"run {p.record.run_id}", f"commit {p.commit}", p.date, p.machine,
                                                 p.verdict)) for p in shown]
    figure = go.Figure(go.Scatter(x=[p.date for p in shown], y=[getattr(p.record.metrics, metric) for p in shown],
                                  mode="lines+markers", text=hover, hoverinfo="text+y",
                                  marker={"color": ["#b00" if p.verdict == REGRESSION else "#1f77b4"
                                                    for p in shown]}))
    figure.update_layout(title=title, height=280, margin={"l": 50, "r": 20, "t": 40, "b": 40})
    return figure.to_html(full_html=False, include_plotlyjs=False)


def regressions(points: list[Point]) -> list[tuple[Point, Point | None]]:
    """Each regression of a combo's series: (first bad run, the run before it, None when it is the first)."""
    return [(p, points[i - 1] if i else None) for i, p in enumerate(points) if p.verdict == REGRESSION]


def _combo_page(gpu_class: str, combo: str, points: list[Point], grid: Path | None) -> str:
    body = "".join(_chart(points, metric, title) for metric, title in CHARTS)
    found = regressions(points)
    if found:
        items = "".join(f"<li class='regression' id='regression-{i}'>first bad commit {esc(bad.commit)} (run "
                        f"{esc(bad.record.run_id)}, {esc(bad.date)}, {esc(bad.machine)}); last good "
                        f"{esc(good.commit) if good else '-'}: {esc(bad.message)}</li>"
                        for i, (bad, good) in enumerate(found))
        body = f"<h2>Regressions</h2><ul>{items}</ul>" + body
    rows = "".join(f"<tr><td>{esc(p.date)}</td><td>{esc(p.record.run_id)}</td><td>{esc(p.commit)}</td>"
                   f"<td>{esc(p.machine)}</td><td>{esc(p.record.outcome)}</td>"
                   f"<td class='{esc(p.verdict.replace(' ', '-'))}'>{esc(p.verdict)}</td>"
                   f"<td>{esc(p.message)}</td></tr>" for p in reversed(points))
    body += ("<h2>Runs</h2><table><tr><th>date</th><th>run</th><th>commit</th><th>machine</th><th>outcome</th>"
             f"<th>the gate's verdict</th><th>message</th></tr>{rows}</table>")
    if grid is not None:
        body += f"<h2>Newest image: reference | candidate | difference</h2><img src='{esc(grid.name)}' alt='grid'>"
    return _page(f"{combo} on {gpu_class}", body, depth=1)


def _markdown(text: str) -> str:
    """Markdown as HTML with raw HTML off: a tag in the text (from a record) is shown, never run."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _class_extras(site: Site, store: HistoryStore, gpu_class: str, newest: str, baselines_dir: Path,
                  decision_settings: decision.Settings | None) -> dict[str, Path]:
    """The class's report page (the newest run's summary and decision) and card page; grids by combo file name."""
    written = publish.write_report(store, site.path(f"{gpu_class}/report/summary.md").parent, baselines_dir,
                                   run_id=newest, decision_settings=decision_settings)
    for path in written:
        site.adopt(path)
    parts = [_markdown(path.read_text()) for path in written if path.suffix == ".md"]
    site.write_text(f"{gpu_class}/report.html", _page(f"newest run on {gpu_class}", "".join(parts), depth=1))
    card = baselines_dir.parent / "docs" / f"detection-card-{gpu_class}.md"
    if card.is_file():
        site.write_text(f"{gpu_class}/card.html", _page(f"detection card: {gpu_class}", _markdown(card.read_text()),
                                                        depth=1))
    return {path.name: site.copy(path, f"{gpu_class}/{path.name}") for path in written if path.parent.name == "grids"}


def build(store: HistoryStore, out: Path, baselines_dir: Path, decision_settings: decision.Settings | None = None,
          progress: Callable[[Path], None] | None = None) -> Path:
    """Write the site for every record of `store` into `out` (the files of an earlier build there removed first);
    returns index.html. Raises site.OutFolderError for an `out` that is or holds the history folder or holds files
    the dashboard did not write (`showing.site`), publish.PublishError when the store holds no readable record,
    OSError when a file cannot be written."""
    import plotly.offline

    site = Site(out, getattr(store, "directory", None))
    records = store.load()
    if not records:
        raise publish.PublishError(f"{store}: no readable history records to build a dashboard from")
    site.write_text("plotly.min.js", plotly.offline.get_plotlyjs())
    by_combo = series(records)
    sections, flagged = [], []
    for gpu_class in sorted({cls for cls, _ in by_combo}):
        newest = max(r.run_id for r in records if str(r.gpu_class) == gpu_class)
        grids = _class_extras(site, store, gpu_class, newest, baselines_dir, decision_settings)
        rows = []
        for (cls, combo), points in sorted(by_combo.items()):
            if cls != gpu_class:
                continue
            name = f"{file_name(combo)}.html"
            page = site.write_text(f"{gpu_class}/{name}", _combo_page(gpu_class, combo, points,
                                                                      grids.get(f"{file_name(combo)}.png")))
            if progress:
                progress(page)
            link = esc(f"{gpu_class}/{name}")
            flagged += [(gpu_class, combo, link, i, bad) for i, (bad, _) in enumerate(regressions(points))]
            m, last = points[-1].record.metrics, points[-1]
            rows.append(f"<tr><td><a href='{link}'>{esc(combo)}</a></td><td>{esc(last.record.outcome)}</td>"
                        f"<td>{number(m.it_s, '.3f')}</td><td>{number(m.peak_mem_gib, '.2f')}</td>"
                        f"<td>{number(m.ms_ssim, '.4f')}</td><td>{esc(last.verdict)}</td><td>{len(points)}</td></tr>")
        extras = f"<a href='{esc(gpu_class)}/report.html'>newest run: summary and decision</a>"
        if f"{gpu_class}/card.html" in site.files:
            extras += f" | <a href='{esc(gpu_class)}/card.html'>detection card</a>"
        sections.append(f"<h2>{esc(gpu_class)}</h2><p>{extras}</p><table><tr><th>combo</th><th>newest outcome</th>"
                        "<th>it/s</th><th>peak GiB</th><th>MS-SSIM</th><th>verdict</th><th>runs</th></tr>"
                        + "".join(rows) + "</table>")
    found = "".join(f"<li class='regression'><a href='{link}#regression-{i}'>{esc(combo)} on {esc(cls)}</a>: first "
                    f"bad commit {esc(bad.commit)}, {esc(bad.date)}</li>" for cls, combo, link, i, bad in flagged)
    head = (f"<h2>Regressions</h2><ul id='regressions'>{found}</ul>" if found
            else "<h2>Regressions</h2><p id='regressions'>none in this history</p>")
    runs = len({r.run_id for r in records})
    return site.write_text("index.html", _page("fluxgate dashboard", f"<p>{runs} runs, {len(records)} records.</p>"
                                               f"{head}" + "".join(sections), depth=0))
