// clues dashboards: the paged sample table, score charts and live job progress, shared by the coordinator's and
// the silos' pages. Plain browser JavaScript; charts use Plotly served by the same server (no CDN).
"use strict";

const clues = (() => {
  const esc = (s) =>
    String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  // significant digits, not decimals: trace scores are often ~1e-5 (η_t times a cosine)
  const num = (x, digits = 4) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toPrecision(digits));
  const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);

  async function request(method, url, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (e) {
      data = { detail: text };
    }
    if (!response.ok) {
      const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : response.statusText;
      throw new Error(`${response.status}: ${detail}`);
    }
    return data;
  }
  const getJSON = (url) => request("GET", url);
  const postJSON = (url, body) => request("POST", url, body);

  const CHART = { displayModeBar: false, responsive: true };
  const MARGIN = { l: 50, r: 20, t: 36, b: 44 };
  const COLORS = ["#2f5bd3", "#e07b39", "#1b9e77", "#9467bd", "#d62728", "#8c564b", "#17becf", "#bcbd22"];

  // Overlaid histograms on shared bin edges, the threshold drawn as a dashed vertical line.
  function histogram(el, edges, series, threshold, title, xtitle = "trace score") {
    const centers = edges.slice(0, -1).map((e, i) => (e + edges[i + 1]) / 2);
    const width = edges.length > 1 ? edges[1] - edges[0] : 1;
    const traces = series.map((s, i) => ({
      type: "bar", name: s.name, x: centers, y: s.counts, width, opacity: 0.65,
      marker: { color: s.color || COLORS[i % COLORS.length] },
      hovertemplate: `${esc(s.name)}: %{y} samples near %{x:.4f}<extra></extra>`,
    }));
    const shapes = [], annotations = [];
    if (threshold !== null && threshold !== undefined) {
      shapes.push({ type: "line", x0: threshold, x1: threshold, yref: "paper", y0: 0, y1: 1, line: { color: "#c2332b", width: 2, dash: "dash" } });
      annotations.push({ x: threshold, yref: "paper", y: 1.02, text: `threshold ${num(threshold)}`, showarrow: false, xanchor: "left", font: { color: "#c2332b" } });
    }
    Plotly.newPlot(el, traces, {
      barmode: "overlay", title: { text: title, font: { size: 14 } }, shapes, annotations, margin: MARGIN,
      xaxis: { title: { text: xtitle }, range: [edges[0], edges[edges.length - 1]] }, yaxis: { title: { text: "samples" } }, legend: { orientation: "h", y: -0.25 },
    }, CHART);
    el.dataset.threshold = threshold ?? "";
    el.dataset.rendered = "histogram";
  }

  function boxes(el, groups, threshold, title, ytitle = "trace score") {
    const traces = groups.map((g, i) => ({ type: "box", name: g.name, y: g.values, boxpoints: "outliers", marker: { color: COLORS[i % COLORS.length] } }));
    const shapes = threshold === null || threshold === undefined ? [] :
      [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: threshold, y1: threshold, line: { color: "#c2332b", width: 2, dash: "dash" } }];
    Plotly.newPlot(el, traces, { title: { text: title, font: { size: 14 } }, shapes, margin: MARGIN, showlegend: false, yaxis: { title: { text: ytitle } } }, CHART);
    el.dataset.rendered = "box";
  }

  function bars(el, x, series, title, options = {}) {
    const traces = series.map((s, i) => ({ type: "bar", name: s.name, x, y: s.values, marker: { color: s.color || COLORS[i % COLORS.length] },
      text: options.percent ? s.values.map(pct) : undefined, textposition: options.percent ? "auto" : undefined }));
    Plotly.newPlot(el, traces, {
      barmode: options.stack ? "relative" : "group", title: { text: title, font: { size: 14 } }, margin: MARGIN,
      yaxis: { title: { text: options.ytitle || "" }, tickformat: options.percent ? ".0%" : undefined, range: options.percent ? [0, 1] : undefined },
      legend: { orientation: "h", y: -0.25 },
    }, CHART);
    el.dataset.rendered = "bars";
  }

  function lines(el, x, series, title, ytitle) {
    const traces = series.map((s, i) => ({ type: "scatter", mode: "lines+markers", name: s.name, x, y: s.values, marker: { color: COLORS[i % COLORS.length] } }));
    Plotly.newPlot(el, traces, { title: { text: title, font: { size: 14 } }, margin: MARGIN, xaxis: { title: { text: "round" }, dtick: 1 }, yaxis: { title: { text: ytitle || "" } }, legend: { orientation: "h", y: -0.25 } }, CHART);
    el.dataset.rendered = "lines";
  }

  // A table whose rows come a page at a time from the server: header clicks sort, the filter form filters,
  // the pager pages. `columns`: [{key, label, sort (server sort key, optional), cls, render(row) -> html}].
  function table({ root, url, columns, form, sort = "row", desc = false, pageSize = 50, csvLink = null, rowClass = null, onRows = null }) {
    const thead = root.querySelector("thead"), tbody = root.querySelector("tbody");
    const pager = root.querySelector(".pager");
    const state = { sort, desc, offset: 0, limit: pageSize, total: 0, loads: 0, seq: 0 };
    thead.innerHTML = "<tr>" + columns.map((c) => `<th${c.sort ? ` data-sort="${esc(c.sort)}"` : ""}>${esc(c.label)}</th>`).join("") + "</tr>";

    function filters() {
      const params = new URLSearchParams();
      if (form) for (const [k, v] of new FormData(form)) if (String(v).trim() !== "") params.set(k, String(v).trim());
      params.set("sort", state.sort);
      params.set("order", state.desc ? "desc" : "asc");
      return params;
    }
    function markSorted() {
      for (const th of thead.querySelectorAll("th[data-sort]")) {
        th.classList.toggle("sorted-asc", th.dataset.sort === state.sort && !state.desc);
        th.classList.toggle("sorted-desc", th.dataset.sort === state.sort && state.desc);
      }
    }
    async function load() {
      const params = filters();
      if (csvLink) csvLink.href = `${csvLink.dataset.base}?${params}`;
      params.set("limit", state.limit);
      params.set("offset", state.offset);
      markSorted();
      root.dataset.state = "loading";
      const seq = ++state.seq;  // only the latest request's answer is shown (answers may arrive out of order)
      let data;
      try {
        data = await getJSON(`${url}?${params}`);
      } catch (e) {
        if (seq !== state.seq) return;
        tbody.innerHTML = `<tr><td colspan="${columns.length}" class="error">${esc(e.message)}</td></tr>`;
        root.dataset.state = "error";
        return;
      }
      if (seq !== state.seq) return;
      state.total = data.total;
      tbody.innerHTML = data.rows.length
        ? data.rows.map((r) => `<tr class="${rowClass ? rowClass(r) : ""}" data-id="${esc(r.sample_id)}">` +
            columns.map((c) => `<td class="${c.cls || ""}">${c.render ? c.render(r) : esc(r[c.key])}</td>`).join("") + "</tr>").join("")
        : `<tr><td colspan="${columns.length}" class="muted">No samples match.</td></tr>`;
      const first = data.total ? state.offset + 1 : 0, last = state.offset + data.rows.length;
      pager.querySelector(".info").textContent = `${first.toLocaleString()}–${last.toLocaleString()} of ${data.total.toLocaleString()}`;
      pager.querySelector(".prev").disabled = state.offset === 0;
      pager.querySelector(".next").disabled = last >= data.total;
      state.loads += 1;
      root.dataset.loads = state.loads;
      root.dataset.total = data.total;
      root.dataset.state = "ready";
      if (onRows) onRows(data.rows, tbody);
    }
    thead.addEventListener("click", (ev) => {
      const th = ev.target.closest("th[data-sort]");
      if (!th) return;
      if (state.sort === th.dataset.sort) state.desc = !state.desc;
      else { state.sort = th.dataset.sort; state.desc = th.dataset.sort === "score" || th.dataset.sort.startsWith("part:"); }
      state.offset = 0;
      load();
    });
    if (form) {
      form.addEventListener("submit", (ev) => { ev.preventDefault(); state.offset = 0; load(); });
      form.addEventListener("change", () => { state.offset = 0; load(); });
    }
    pager.querySelector(".prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); load(); });
    pager.querySelector(".next").addEventListener("click", () => { state.offset += state.limit; load(); });
    const size = pager.querySelector(".page-size");
    if (size) { size.value = String(pageSize); size.addEventListener("change", () => { state.limit = Number(size.value); state.offset = 0; load(); }); }
    load();
    return { reload: load, state };
  }

  // Poll `url` every `ms` while the page is open; `update(data)` returns false to stop.
  function poll(url, ms, update) {
    let timer = null;
    async function tick() {
      try {
        if ((await update(await getJSON(url))) === false) return;
      } catch (e) {
        console.warn("poll", url, e);
      }
      timer = setTimeout(tick, ms);
    }
    timer = setTimeout(tick, ms);
    return () => clearTimeout(timer);
  }

  // One job's page while it runs: the progress bar and message follow the job; the page reloads once `changed(job)`
  // says its state moved on (e.g. the scores exist).
  function followJob(url, changed) {
    poll(url, 2000, (j) => {
      if (changed(j)) { location.reload(); return false; }
      document.querySelector("#job-state .bar").style.width = `${(100 * j.progress).toFixed(1)}%`;
      document.querySelector("#job-state .message").textContent = j.message;
    });
  }

  // Sample-table columns of the T per-checkpoint terms, each sortable server-side (`part:<t>`).
  const partColumns = (T) =>
    Array.from({ length: T }, (_, t) => ({ label: `t${t}`, sort: `part:${t}`, cls: "num", render: (r) => num(r.parts[t]) }));

  // The signal columns of a job that keeps them (`webui.signal_columns`): `data` (each raw value, then each fused
  // signal's calibrated z, positive = worse than a typical anchor sample) and `why` (for a sample the threshold
  // dropped, the signal that flagged it, in words). Empty for a pure trace job.
  const VALUE_LABELS = { trace: "trace", loss: "ℓ(y|x)", loss_uncond: "ℓ(y|∅)", n_tokens: "tokens" };
  function signalColumns(values, fused) {
    const value = (r, name) => (r.values && r.values[name] !== undefined ? r.values[name] : null);
    const data = [
      ...values.map((name) => ({ label: VALUE_LABELS[name] || name, cls: `num value value-${name}`,
        render: (r) => (name === "n_tokens" ? esc(value(r, name) ?? "–") : num(value(r, name))) })),
      ...fused.map((name) => ({ label: `z ${name}`, cls: `num z z-${name}`,
        render: (r) => { const z = r.z ? r.z[name] : null; return z === null || z === undefined ? "–" :
          `<span class="${z >= 2 ? "z-high" : ""}">${num(z, 3)}</span>`; } })),
    ];
    const why = fused.length ? [{ label: "Why dropped", cls: "why small", render: (r) => (!r.auto_selected && r.flagged_by
      ? `<span class="flag" title="${esc(r.flagged_by)}: z = ${num(r.z && r.z[r.flagged_by], 3)}">${esc(r.flag_reason)}</span> <span class="muted">(${esc(r.flagged_by)})</span>`
      : "") }] : [];
    return { data, why };
  }

  // Live progress of the job rows on a list page: rows carry data-job / data-kind, cells .status/.progress/.message/.error.
  function liveJobs(kind, url, ms = 2000) {
    poll(url, ms, (jobs) => {
      for (const job of jobs) {
        const row = document.querySelector(`tr[data-kind="${kind}"][data-job="${CSS.escape(job.id)}"]`);
        if (!row) continue;
        row.querySelector(".status").textContent = job.status;
        row.querySelector(".status").className = `status status-${job.status}`;
        const bar = row.querySelector(".progress .bar");
        bar.style.width = `${(100 * job.progress).toFixed(1)}%`;
        bar.className = `bar status-${job.status}`;
        row.querySelector(".message").textContent = job.message || "";
        const err = row.querySelector(".err");
        err.textContent = job.error || "";
        err.hidden = !job.error;
      }
    });
  }

  return { esc, num, pct, getJSON, postJSON, histogram, boxes, bars, lines, table, poll, followJob, partColumns, signalColumns, liveJobs, COLORS };
})();
