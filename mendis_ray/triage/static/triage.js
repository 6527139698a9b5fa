"use strict";
// mendis triage page: everything runs from the inline data; nothing is fetched except the
// verdict POSTs to data-api (when the page is served by `mendis serve --triage`).
(function () {
  const D = JSON.parse(document.getElementById("triage-data").textContent);
  const API = document.body.dataset.api || "";
  const STORE = "mendis-triage:" + D.catalog;
  const WL = D.wavelength;
  const $ = (id) => document.getElementById(id);
  let verdicts = Object.assign({}, D.verdicts || {});
  if (!API) {
    try { Object.assign(verdicts, JSON.parse(localStorage.getItem(STORE) || "{}")); } catch (e) { /* private mode */ }
  }
  let cur = 0;
  let view = null; // [lo, hi] wavelength window, null = whole spectrum
  let drag = null;
  const order = D.stars.map((_, i) => i);

  // ---------------------------------------------------------------- helpers
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function fmt(v, d) {
    if (v === null || v === undefined || v === "") return "";
    if (typeof v === "number") return Math.abs(v) >= 1e5 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(2) : v.toFixed(d === undefined ? 3 : d);
    return String(v);
  }
  function featureName(f) {
    const id = f.line || f.response_element || "";
    if (f.kind === "emission") return id ? "emission near " + id : "emission";
    return id;
  }
  function status(text, isError) {
    const s = $("save-status");
    s.textContent = text;
    s.className = isError ? "error" : "";
  }
  const medStep = (() => {
    const d = [];
    for (let i = 1; i < WL.length; i++) d.push(WL[i] - WL[i - 1]);
    d.sort((a, b) => a - b);
    return d.length ? d[Math.floor(d.length / 2)] : 1;
  })();

  // ---------------------------------------------------------------- list
  function visible(i) {
    const f = $("filter").value;
    const v = verdicts[D.stars[i].id];
    if (f === "all") return true;
    if (f === "todo") return !v;
    return v && v.verdict === f;
  }
  function renderList() {
    const ol = $("list");
    ol.replaceChildren();
    const counts = { interesting: 0, artefact: 0, normal: 0 };
    for (const i of order) {
      const s = D.stars[i];
      const v = verdicts[s.id];
      if (v && counts[v.verdict] !== undefined) counts[v.verdict]++;
      if (!visible(i)) continue;
      const li = el("li", null, i === cur ? "selected" : "");
      li.dataset.index = i;
      li.dataset.id = s.id;
      li.append(el("span", "#" + s.rank, "rank"), el("span", s.id, "sid"));
      li.append(v ? el("span", v.verdict, "badge " + v.verdict) : el("span", ""));
      const m = s.main;
      const bits = [];
      if (m.percentile !== undefined) bits.push("pct " + fmt(m.percentile, 1));
      if (m.flag_names) bits.push(m.flag_names);
      if (s.features.length) bits.push(featureName(s.features[0]));
      li.append(el("span", bits.filter(Boolean).join(" · "), "sub"));
      li.addEventListener("click", () => select(i));
      ol.append(li);
    }
    $("counts").textContent = `${D.stars.length} stars · ${counts.interesting} interesting · ${counts.artefact} artefact · ${counts.normal} normal`;
  }

  // ---------------------------------------------------------------- star panel
  function select(i) {
    cur = i;
    view = null;
    renderList();
    renderStar();
    const li = document.querySelector(`#list li[data-index="${i}"]`);
    if (li) li.scrollIntoView({ block: "nearest" });
  }
  function renderStar() {
    const s = D.stars[cur];
    document.body.dataset.current = s.id;
    $("star-title").textContent = `#${s.rank}  ${s.id}`;
    const main = $("star-main");
    main.replaceChildren();
    for (const [k, v] of Object.entries(s.main)) {
      if (v === null || v === "") continue;
      const span = el("span");
      span.append(el("b", k + " "), document.createTextNode(fmt(v, k.endsWith("_used") || k === "snr" ? 2 : 3)));
      main.append(span);
    }
    $("ref-name").textContent = s.ref_id ? "(" + s.ref_id + ")" : "(none to compare)";
    $("explanation").textContent = s.explanation || "no explanation (no typical spectrum to compare with)";
    const fb = document.querySelector("#features tbody");
    fb.replaceChildren();
    for (const f of s.features) {
      const tr = el("tr");
      tr.append(el("td", f.feature), el("td", fmt(f.wavelength, 2)), el("td", fmt(f.wl_lo, 1) + "–" + fmt(f.wl_hi, 1)),
        el("td", fmt(f.depth, 3)), el("td", fmt(f.z_peak, 1)), el("td", f.kind, "l"), el("td", f.line, "l"), el("td", f.element, "l"),
        el("td", f.response_element, "l"));
      tr.addEventListener("click", () => zoomTo(f.wl_lo - 12, f.wl_hi + 12));
      fb.append(tr);
    }
    if (!s.features.length) {
      const tr = el("tr");
      const td = el("td", "no pixel deviates beyond the threshold", "l");
      td.colSpan = 9;
      tr.append(td);
      fb.append(tr);
    }
    const eb = document.querySelector("#elements tbody");
    eb.replaceChildren();
    for (const e of s.elements.slice(0, 8)) {
      const tr = el("tr");
      tr.append(el("td", e.element, "l"), el("td", fmt(e.offset_dex, 2) + (e.clipped ? " (clipped)" : "")),
        el("td", (100 * e.share).toFixed(1) + "%"), el("td", e.n_pix));
      eb.append(tr);
    }
    $("elements").hidden = !s.elements.length;
    const all = document.querySelector("#all-cols tbody");
    all.replaceChildren();
    for (const [k, v] of Object.entries(s.row)) {
      const tr = el("tr");
      tr.append(el("th", k), el("td", fmt(v), "l"));
      all.append(tr);
    }
    const v = verdicts[s.id];
    for (const b of document.querySelectorAll(".verdict")) b.classList.toggle("active", !!v && v.verdict === b.dataset.verdict);
    $("note").value = v ? v.note || "" : "";
    draw();
  }

  // ---------------------------------------------------------------- plot
  function zoomTo(lo, hi) {
    if (!(hi > lo)) return;
    view = [lo, hi];
    draw();
  }
  function range() { return view || [WL[0], WL[WL.length - 1]]; }
  function draw() {
    const s = D.stars[cur];
    const cv = $("plot");
    const dpr = window.devicePixelRatio || 1;
    const W = cv.clientWidth, H = cv.clientHeight;
    cv.width = Math.round(W * dpr);
    cv.height = Math.round(H * dpr);
    const g = cv.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, W, H);
    const [lo, hi] = range();
    $("wl-lo").value = lo.toFixed(1);
    $("wl-hi").value = hi.toFixed(1);
    const L = 58, R = 12, T = 10, gap = 14, B = 34;
    const h1 = Math.round((H - T - B - gap) * 0.64), h2 = H - T - B - gap - h1;
    const top = { y0: T, h: h1 }, bot = { y0: T + h1 + gap, h: h2 };
    const X = (w) => L + (w - lo) / (hi - lo) * (W - L - R);
    const idx = [];
    for (let i = 0; i < WL.length; i++) if (WL[i] >= lo && WL[i] <= hi) idx.push(i);
    const res = s.ref ? s.flux.map((f, i) => (f === null || s.ref[i] === null ? null : f - s.ref[i])) : s.flux.map(() => null);
    let ymin = Infinity, ymax = -Infinity, rmax = 0;
    for (const i of idx) {
      for (const a of [s.flux, s.ref]) if (a && a[i] !== null) { ymin = Math.min(ymin, a[i]); ymax = Math.max(ymax, a[i]); }
      if (res[i] !== null) rmax = Math.max(rmax, Math.abs(res[i]));
    }
    if (!isFinite(ymin)) { ymin = 0; ymax = 1.2; }
    const pad = 0.05 * (ymax - ymin || 1);
    ymin -= pad; ymax += pad;
    rmax = rmax || 0.05;
    const Y1 = (v) => top.y0 + (1 - (v - ymin) / (ymax - ymin)) * top.h;
    const Y2 = (v) => bot.y0 + (0.5 - v / (2.2 * rmax)) * bot.h;
    // feature bands
    g.fillStyle = "rgba(220, 40, 40, 0.18)";
    g.font = "11px system-ui, sans-serif";
    for (const f of s.features) {
      if (f.wl_hi < lo || f.wl_lo > hi) continue;
      const x0 = X(f.wl_lo - medStep / 2), x1 = X(f.wl_hi + medStep / 2);
      g.fillRect(x0, top.y0, Math.max(2, x1 - x0), top.h);
      g.fillRect(x0, bot.y0, Math.max(2, x1 - x0), bot.h);
      g.fillStyle = "rgba(170, 20, 20, 0.9)";
      g.fillText(String(f.feature), x0 + 1, top.y0 + 10);
      g.fillStyle = "rgba(220, 40, 40, 0.18)";
    }
    // frames and axes
    g.strokeStyle = "#999";
    g.lineWidth = 1;
    for (const p of [top, bot]) g.strokeRect(L, p.y0, W - L - R, p.h);
    g.fillStyle = "#333";
    g.textAlign = "right";
    for (let k = 0; k <= 4; k++) {
      const v = ymin + (ymax - ymin) * k / 4;
      g.fillText(v.toFixed(2), L - 4, Y1(v) + 4);
    }
    for (const v of [-rmax, 0, rmax]) g.fillText(v.toFixed(3), L - 4, Y2(v) + 4);
    g.strokeStyle = "#bbb";
    g.beginPath(); g.moveTo(L, Y2(0)); g.lineTo(W - R, Y2(0)); g.stroke();
    g.textAlign = "center";
    const nt = Math.max(2, Math.floor((W - L - R) / 110));
    const step = niceStep((hi - lo) / nt);
    for (let w = Math.ceil(lo / step) * step; w <= hi; w += step) {
      g.fillText(step < 1 ? w.toFixed(1) : w.toFixed(0), X(w), H - B + 15);
      g.strokeStyle = "#999";
      g.beginPath(); g.moveTo(X(w), bot.y0 + bot.h); g.lineTo(X(w), bot.y0 + bot.h + 4); g.stroke();
    }
    g.fillText(D.xlabel, L + (W - L - R) / 2, H - 4);
    g.save();
    g.translate(12, top.y0 + top.h / 2); g.rotate(-Math.PI / 2); g.fillText("flux", 0, 0); g.restore();
    g.save();
    g.translate(12, bot.y0 + bot.h / 2); g.rotate(-Math.PI / 2); g.fillText("residual", 0, 0); g.restore();
    // curves
    g.save();
    g.beginPath(); g.rect(L, T, W - L - R, H - T - B); g.clip();
    if (s.ref) line(g, idx, s.ref, X, Y1, "#e8770e", 1);
    line(g, idx, s.flux, X, Y1, "#111", 1);
    line(g, idx, res, X, Y2, "#1f5fbf", 1);
    g.restore();
    if (drag && drag.x1 !== undefined) {
      g.fillStyle = "rgba(31, 95, 191, 0.15)";
      g.fillRect(Math.min(drag.x0, drag.x1), T, Math.abs(drag.x1 - drag.x0), H - T - B);
    }
    cv._geom = { L, R, W, lo, hi };
  }
  function line(g, idx, a, X, Y, color, width) {
    g.strokeStyle = color;
    g.lineWidth = width;
    g.beginPath();
    let pen = false, prev = null;
    for (const i of idx) {
      const v = a[i];
      if (v === null || (prev !== null && WL[i] - WL[prev] > 3 * medStep)) { pen = false; }
      if (v === null) { prev = i; continue; }
      if (pen) g.lineTo(X(WL[i]), Y(v)); else g.moveTo(X(WL[i]), Y(v));
      pen = true;
      prev = i;
    }
    g.stroke();
  }
  function niceStep(x) {
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 5, 10]) if (m * p >= x) return m * p;
    return 10 * p;
  }
  function toWl(cv, clientX) {
    const r = cv.getBoundingClientRect();
    const gm = cv._geom;
    const x = clientX - r.left;
    return { x, wl: gm.lo + (x - gm.L) / (gm.W - gm.L - gm.R) * (gm.hi - gm.lo) };
  }

  // ---------------------------------------------------------------- verdicts
  function saveLocal() {
    try { localStorage.setItem(STORE, JSON.stringify(verdicts)); } catch (e) { /* private mode */ }
  }
  async function setVerdict(name) {
    const s = D.stars[cur];
    const old = verdicts[s.id];
    const unset = old && old.verdict === name && $("note").value === (old.note || "");
    const v = { id: s.id, verdict: unset ? "unset" : name, note: $("note").value };
    if (API) {
      status("saving…");
      try {
        const r = await fetch(API, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(v) });
        const body = await r.json();
        if (!r.ok) { status("not saved: " + (body.error || r.status), true); return; }
        verdicts = body.verdicts;
        status(`saved: ${body.n} verdict(s) in ${body.file}`);
        document.body.dataset.saved = String(body.n);
      } catch (e) {
        status("not saved: the server did not answer (" + e + ")", true);
        return;
      }
    } else {
      if (unset) delete verdicts[s.id];
      else verdicts[s.id] = { id: s.id, verdict: name, note: v.note, updated: new Date().toISOString().replace(/\.\d+Z$/, "Z") };
      saveLocal();
      status(`${Object.keys(verdicts).length} verdict(s) kept in this browser: download them and pass the file to mendis score --verdicts`);
    }
    renderList();
    renderStar();
  }
  function download() {
    const doc = { format: "mendis-verdicts-1", catalog: D.catalog, verdicts: Object.values(verdicts) };
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([JSON.stringify(doc, null, 1)], { type: "application/json" }));
    a.download = "verdicts.json";
    document.body.append(a);
    a.click();
    a.remove();
  }

  // ---------------------------------------------------------------- wiring
  function init() {
    $("title").textContent = D.title;
    $("catalog").textContent = `${D.rows ?? "?"} spectra scored with ${D.checkpoint || "?"}; ranked by ${D.rank_by || "?"}; ${D.stars.length} outliers explained`;
    if (!API) {
      $("download").hidden = false;
      status(`static page: verdicts are kept in this browser (${Object.keys(verdicts).length} so far); download them for mendis score --verdicts`);
    } else {
      status(`verdicts are saved by the server (${Object.keys(verdicts).length} so far)`);
    }
    $("download").addEventListener("click", download);
    $("filter").addEventListener("change", renderList);
    for (const b of document.querySelectorAll(".verdict")) b.addEventListener("click", () => setVerdict(b.dataset.verdict));
    $("zoom-apply").addEventListener("click", () => zoomTo(parseFloat($("wl-lo").value), parseFloat($("wl-hi").value)));
    $("zoom-reset").addEventListener("click", () => { view = null; draw(); });
    const cv = $("plot");
    cv.addEventListener("mousedown", (e) => { drag = { x0: toWl(cv, e.clientX).x, w0: toWl(cv, e.clientX).wl }; });
    cv.addEventListener("mousemove", (e) => { if (drag) { drag.x1 = toWl(cv, e.clientX).x; draw(); } });
    window.addEventListener("mouseup", (e) => {
      if (!drag) return;
      const end = toWl(cv, e.clientX);
      const d = drag;
      drag = null;
      if (d.x1 !== undefined && Math.abs(end.x - d.x0) > 5) zoomTo(Math.min(d.w0, end.wl), Math.max(d.w0, end.wl));
      else draw();
    });
    document.addEventListener("keydown", (e) => {
      if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
      const shown = [...document.querySelectorAll("#list li")].map((li) => +li.dataset.index);
      const at = shown.indexOf(cur);
      if ((e.key === "j" || e.key === "ArrowDown") && at < shown.length - 1) select(shown[at + 1]);
      else if ((e.key === "k" || e.key === "ArrowUp") && at > 0) select(shown[at - 1]);
      else if (e.key === "i") setVerdict("interesting");
      else if (e.key === "a") setVerdict("artefact");
      else if (e.key === "n") setVerdict("normal");
      else return;
      e.preventDefault();
    });
    window.addEventListener("resize", draw);
    if (D.stars.length) select(0);
    else $("star").replaceChildren(el("p", "no outliers to show"));
    document.body.dataset.ready = "1";
  }
  init();
})();
