// nanoscout dashboard: draws what the gateway pushes over server-sent events (/events).
// Plain JavaScript and canvas, no third-party code, works offline. Every event replaces the
// previous one of its kind and source (latest-wins); drawing is coalesced into animation frames.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_ALERTS = 50;
  const GATEWAY_STALE_MS = 3500; // the gateway sends a status event every second

  const S = {
    meta: { shape_classes: [], endpoints: [], stale_s: 3 },
    sources: [],
    selected: null,
    per: {},
    health: null,
    status: null,
    alerts: [],
    alertTotal: 0,
    colourBy: "ecd",
    outlines: true,
    trails: true,
    history: null, // the hovered particle's /api/track answer
    historyKey: "",
    cam: false,
    lens: null, // the last /api/lens answer (or {error}) for the selected source
    lensWaiting: false,
    hover: -1,
    mouse: null,
    lastEvent: performance.now(),
    gapKey: "",
    gapChangedAt: 0,
    // the frame view: zoom factor (1 = whole frame) and the top-left corner shown, in preview
    // px; display contrast and brightness in per cent (the analysis never sees them)
    view: { z: 1, x0: 0, y0: 0 },
    contrast: 100,
    brightness: 100,
    drag: null,
  };
  const MAX_ZOOM = 16;
  const ZOOM_STEP = 1.5;

  function per(src) {
    if (!S.per[src]) {
      S.per[src] = { frame: null, shown: null, det: null, stats: null, cls: null, clsShown: null };
    }
    return S.per[src];
  }
  const sel = () => (S.selected ? per(S.selected) : null);

  // ------------------------------------------------------------------ formatting

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  function fmt(v, digits = 1) {
    return isNum(v) ? v.toFixed(digits) : "–";
  }
  function fmtSig(v) {
    if (!isNum(v)) return "–";
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    if (a >= 1000) return v.toFixed(0);
    if (a >= 100) return v.toFixed(1);
    if (a >= 1) return v.toFixed(2);
    if (a < 1e-3) return v.toExponential(1);
    return v.toPrecision(2);
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function fmtAgo(s, digits) {
    if (s >= 120) return `−${(s / 60).toFixed(s >= 600 ? 0 : 1)} min`;
    return `−${s.toFixed(digits)} s`;
  }
  function fmtDuration(s) {
    if (!isNum(s)) return "–";
    if (s < 120) return `${s.toFixed(0)} s`;
    if (s < 7200) return `${(s / 60).toFixed(0)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }
  const cssVar = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  // ------------------------------------------------------------------ colours

  // bright "turbo"-like ramp that stays visible on grey micrographs
  const RAMP = [[48, 123, 246], [30, 200, 230], [80, 220, 120], [240, 220, 60], [250, 140, 40], [235, 60, 50]];
  function ramp(t) {
    t = Math.min(1, Math.max(0, isNum(t) ? t : 0)) * (RAMP.length - 1);
    const i = Math.min(RAMP.length - 2, Math.floor(t));
    const f = t - i;
    const c = RAMP[i].map((v, k) => Math.round(v + f * (RAMP[i + 1][k] - v)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }
  const CLASS_COLOURS = ["#b8b8b8", "#4fb3ff", "#f0a040", "#6ee7a8", "#c792ea", "#ff6b6b", "#ffe066", "#80deea"];
  const classColour = (i) => CLASS_COLOURS[i % CLASS_COLOURS.length];
  const CLUSTER_COLOURS = ["#ff6b6b", "#4fb3ff", "#ffe066", "#6ee7a8", "#c792ea", "#f0a040", "#80deea", "#f78fb3"];
  const noCluster = (c) => !isNum(c) || c === (S.meta.no_cluster ?? 255);
  const clusterColour = (c) => (noCluster(c) ? "#8a96a3" : CLUSTER_COLOURS[c % CLUSTER_COLOURS.length]);
  const className = (i) => S.meta.shape_classes[i] || `class ${i}`;

  // ------------------------------------------------------------------ drawing scheduler

  const dirty = new Set();
  let rafPending = false;
  function mark(...what) {
    for (const w of what) dirty.add(w);
    if (!rafPending) {
      rafPending = true;
      requestAnimationFrame(flush);
    }
  }
  function flush() {
    rafPending = false;
    const d = new Set(dirty);
    dirty.clear();
    const all = d.has("all");
    if (all || d.has("sources")) renderSources();
    if (all || d.has("top")) renderTop();
    if (all || d.has("frame")) renderFrame();
    if (all || d.has("stats")) renderStats();
    if (all || d.has("stats")) renderClusters();
    if (all || d.has("lens")) renderLens();
    if (all || d.has("class")) renderClass();
    if (all || d.has("health")) renderHealth();
    if (all || d.has("alerts")) renderAlerts();
    if (all || d.has("status") || d.has("top") || d.has("health")) renderStatus();
  }

  // ------------------------------------------------------------------ events

  function loadImage(b64, onload) {
    const img = new Image();
    img.onload = () => onload(img);
    img.onerror = () => console.warn("nanoscout: could not decode a picture");
    img.src = "data:image/png;base64," + b64;
  }

  const es = new EventSource("/events");
  function on(name, fn) {
    es.addEventListener(name, (e) => {
      S.lastEvent = performance.now();
      fn(JSON.parse(e.data));
    });
  }
  es.onopen = () => {
    S.lastEvent = performance.now();
    mark("status");
  };
  es.onerror = () => mark("status");

  on("meta", (d) => {
    S.meta = d;
    mark("all");
  });
  on("sources", (d) => {
    S.sources = d.sources;
    if (!S.selected || !S.sources.includes(S.selected)) S.selected = S.sources[0] || null;
    mark("all");
  });
  on("frame", (d) => {
    const p = per(d.source);
    p.frame = d;
    if (!d.png) {
      // no picture (the daemon restarted, its first preview not here yet): the placeholder,
      // not the earlier run's frame
      p.shown = null;
      if (d.source === S.selected) mark("frame");
      return;
    }
    loadImage(d.png, (img) => {
      if (p.frame !== d) return; // a newer one is on its way: latest wins
      p.shown = { frame: d, img };
      if (d.source !== S.selected) return;
      if (S.mouse) showTooltip(S.mouse); // the particle under the pointer is another one now
      mark("frame");
    });
  });
  on("det", (d) => {
    per(d.source).det = d;
    if (d.source === S.selected) mark("top");
  });
  on("stats", (d) => {
    per(d.source).stats = d;
    if (d.source === S.selected) mark("stats", "frame");
  });
  on("class", (d) => {
    const p = per(d.source);
    p.cls = d;
    if (d.heatmap_png) {
      loadImage(d.heatmap_png, (img) => {
        if (p.cls !== d) return;
        p.clsShown = { cls: d, img };
        if (d.source === S.selected) mark("class", "frame");
      });
    } else {
      p.clsShown = null;
    }
    if (d.source === S.selected) mark("class", "frame");
  });
  on("health", (d) => {
    S.health = d;
    mark("health");
  });
  on("status", (d) => {
    S.status = d;
    mark("status");
  });
  on("alert", (d) => {
    d._fresh = true;
    S.alerts.unshift(d);
    S.alertTotal += 1;
    if (S.alerts.length > MAX_ALERTS) S.alerts.length = MAX_ALERTS;
    mark("alerts");
  });
  setInterval(() => mark("status"), 500); // the gateway-silence check needs a clock

  // ------------------------------------------------------------------ controls

  $("source").addEventListener("change", (e) => {
    S.selected = e.target.value;
    S.hover = -1;
    S.lens = null; // the lens view belongs to the source it was asked for
    S.view = { z: 1, x0: 0, y0: 0 };
    mark("all");
  });
  function setColour(mode) {
    S.colourBy = mode;
    $("colour-ecd").classList.toggle("on", mode === "ecd");
    $("colour-class").classList.toggle("on", mode === "class");
    $("colour-cluster").classList.toggle("on", mode === "cluster");
    mark("frame");
  }
  $("colour-ecd").addEventListener("click", () => setColour("ecd"));
  $("colour-class").addEventListener("click", () => setColour("class"));
  $("colour-cluster").addEventListener("click", () => setColour("cluster"));
  $("show-outlines").addEventListener("change", (e) => {
    S.outlines = e.target.checked;
    mark("frame");
  });
  $("show-trails").addEventListener("change", (e) => {
    S.trails = e.target.checked;
    mark("frame");
  });
  // what each control says once the daemon took it (source, extra query)
  const DONE = {
    reset_statistics: (s) => `statistics of ${s} reset: counting from the next frame`,
    set_drift_reference: (s) => `drift of ${s} is zero from the next frame`,
    set_particle_size: (s, q) => (q
      ? `particles of ${s}: median diameter ${q.low}–${q.high} nm from the next frame`
      : `${s} has no size range of its own from the next frame`),
  };
  async function control(action, q) {
    const msg = $("control-msg");
    if (!S.selected) return;
    msg.hidden = false;
    msg.textContent = "asking the daemon…";
    const extra = q ? `&low=${encodeURIComponent(q.low)}&high=${encodeURIComponent(q.high)}` : "";
    try {
      const r = await fetch(`/api/control?source=${encodeURIComponent(S.selected)}&action=${action}${extra}`,
        { method: "POST", headers: { "X-Nanoscout": "1" } });
      const d = await r.json();
      msg.textContent = d.ok ? DONE[action](S.selected, q) : `not done: ${d.error}`;
    } catch (err) {
      msg.textContent = `not done: ${err}`;
    }
  }
  $("reset-stats").addEventListener("click", () => control("reset_statistics"));
  $("drift-ref").addEventListener("click", () => control("set_drift_reference"));
  $("size-set").addEventListener("click", () => {
    const q = { low: $("size-low").value, high: $("size-high").value };
    if (q.low === "" || q.high === "") {
      $("control-msg").hidden = false;
      $("control-msg").textContent = "give the low and the high median diameter, nm";
      return;
    }
    control("set_particle_size", q);
  });
  $("size-clear").addEventListener("click", () => control("set_particle_size", null));
  $("show-cam").addEventListener("change", (e) => {
    S.cam = e.target.checked;
    mark("frame");
  });
  window.addEventListener("resize", () => mark("frame", "stats"));

  // zoom and pan: buttons, the mouse wheel (about the pointer), drag, double-click = whole frame
  function frameSize() {
    const p = sel();
    return p && p.shown ? p.shown.frame.size : null; // [rows, cols] of the preview
  }
  function clampView() {
    const size = frameSize();
    const v = S.view;
    v.z = Math.min(MAX_ZOOM, Math.max(1, v.z));
    if (!size) return;
    const [rows, cols] = size;
    v.x0 = Math.min(Math.max(0, v.x0), cols - cols / v.z);
    v.y0 = Math.min(Math.max(0, v.y0), rows - rows / v.z);
  }
  function zoomAt(factor, fx = 0.5, fy = 0.5) {
    // keep the preview point under (fx, fy) -- fractions of the canvas -- where it is
    const size = frameSize();
    const v = S.view;
    if (!size) return;
    const [rows, cols] = size;
    const px = v.x0 + (fx * cols) / v.z;
    const py = v.y0 + (fy * rows) / v.z;
    v.z = Math.min(MAX_ZOOM, Math.max(1, v.z * factor));
    v.x0 = px - (fx * cols) / v.z;
    v.y0 = py - (fy * rows) / v.z;
    clampView();
    mark("frame");
  }
  function resetView() {
    S.view = { z: 1, x0: 0, y0: 0 };
    mark("frame");
  }
  $("zoom-in").addEventListener("click", () => zoomAt(ZOOM_STEP));
  $("zoom-out").addEventListener("click", () => zoomAt(1 / ZOOM_STEP));
  $("zoom-fit").addEventListener("click", resetView);
  $("frame").addEventListener("dblclick", resetView);
  $("frame").addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = $("frame").getBoundingClientRect();
    zoomAt(e.deltaY < 0 ? ZOOM_STEP : 1 / ZOOM_STEP, (e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height);
  }, { passive: false });
  $("frame").addEventListener("pointerdown", (e) => {
    if (e.button !== 0 || S.view.z <= 1) return;
    S.drag = { x: e.clientX, y: e.clientY, x0: S.view.x0, y0: S.view.y0 };
    $("frame").setPointerCapture(e.pointerId);
    $("frame").classList.add("panning");
  });
  $("frame").addEventListener("pointermove", (e) => {
    if (!S.drag) return;
    const size = frameSize();
    if (!size) return;
    const r = $("frame").getBoundingClientRect();
    S.view.x0 = S.drag.x0 - ((e.clientX - S.drag.x) / r.width) * (size[1] / S.view.z);
    S.view.y0 = S.drag.y0 - ((e.clientY - S.drag.y) / r.height) * (size[0] / S.view.z);
    clampView();
    mark("frame");
  });
  const endDrag = () => {
    S.drag = null;
    $("frame").classList.remove("panning");
  };
  $("frame").addEventListener("pointerup", endDrag);
  $("frame").addEventListener("pointercancel", endDrag);
  $("contrast").addEventListener("input", (e) => {
    S.contrast = Number(e.target.value);
    mark("frame");
  });
  $("brightness").addEventListener("input", (e) => {
    S.brightness = Number(e.target.value);
    mark("frame");
  });
  $("contrast-reset").addEventListener("click", () => {
    S.contrast = 100;
    S.brightness = 100;
    $("contrast").value = "100";
    $("brightness").value = "100";
    mark("frame");
  });

  // ------------------------------------------------------------------ top bar, banners

  function renderSources() {
    const box = $("source");
    const have = Array.from(box.options).map((o) => o.value);
    if (have.join("\n") !== S.sources.join("\n")) {
      box.innerHTML = S.sources.map((s) => `<option value="${esc(s)}">${esc(s)}</option>`).join("");
    }
    if (S.selected) box.value = S.selected;
    box.disabled = S.sources.length < 2;
  }

  // det.size_hint (protocol 1.8) as shown in the top bar: [text, explanation]; "agreed" and
  // no range show nothing
  const SIZE_HINTS = {
    applied: ["scale from the size range",
              "The working-scale estimate lay outside the particle size range this frame " +
              "named (specks, support lumps or texture taken for particles?): the range's " +
              "nearest end set the scale"],
    uncalibrated: ["size range unused",
                   "This frame named a particle size range in nm but has no pixel size"],
    unused: ["size range unused",
             "The working scale is fixed or preset for this pixel size: nothing to guide"],
  };

  function renderTop() {
    const p = sel();
    const d = p && p.det;
    $("frame-seq").textContent = d ? `#${d.seq}` : "–";
    $("frame-count").textContent = d ? String(d.frames) : "0";
    $("frame-n").textContent = d ? String(d.n) : "–";
    // null: the daemon's times give no latency (a result stamped before its frame arrived)
    $("frame-latency").textContent = !d ? "–" : isNum(d.latency_ms) ? `${fmt(d.latency_ms, 0)} ms` : "unknown";
    $("frame-fps").textContent = d ? fmt(d.fps, 1) : "–";
    // protocol 1.7: an adapted model handed this frame to its base network (size band, count check)
    $("frame-base-only").hidden = !(d && d.base_network_only);
    // protocol 1.8: what the frame's particle size range did to the working scale
    const hint = d && SIZE_HINTS[d.size_hint];
    $("frame-size-hint").hidden = !hint;
    if (hint) {
      $("frame-size-hint").textContent = hint[0];
      $("frame-size-hint").title = hint[1];
    }
    // protocol 1.9: a low-dose frame smoothed before the network (its noise above the card's
    // target); not shown for frames left as they were, or where the noise is not measured
    const smoothed = d && isNum(d.smoothing_px) && d.smoothing_px > 0;
    $("frame-smoothed").hidden = !smoothed;
    if (smoothed) {
      $("frame-smoothed").textContent = `low dose: smoothed ${fmt(d.smoothing_px, 1)} px`;
      $("frame-smoothed").title = "This frame's white noise" +
        (isNum(d.noise) ? ` (${fmt(d.noise, 3)} of its normalised range)` : "") +
        " was above the model's target, so it was smoothed by a Gaussian of this width " +
        "before the network (noise specks are not taken for particles)";
    }
    renderGaps();
  }

  // The daemon's transport gaps by source (protocol 1.3); null from a daemon that sends only
  // the total.
  function sourceGaps(h) {
    const v = h && h.transport_gaps_by_source;
    return v && typeof v === "object" && !Array.isArray(v) ? v : null;
  }

  // What counts as loss (amber banner): results that never reached this dashboard, frames lost
  // between the adapter and the daemon, and frames the daemon dropped for a fault. Frames a
  // live daemon skips because a newer one came ("superseded") are its policy, not loss.
  function lossParts(p, h) {
    const d = p && p.det;
    const parts = [];
    let key = "";
    if (d && isNum(d.lost)) {
      // the daemon numbers its results per topic (topic_seq): a gap is a result lost here
      if (d.lost > 0) {
        parts.push(`${esc(d.source)}: ${d.lost} result${d.lost === 1 ? "" : "s"} lost on the way to this dashboard`);
        key += `l${d.lost}`;
      }
    } else if (d && d.missed > 0 && h && h.policy === "lossless") {
      // no topic_seq: a frame-seq gap is loss only where every frame is answered
      parts.push(`${esc(d.source)}: ${d.missed} frame${d.missed === 1 ? "" : "s"} without results ` +
        `(${d.gap_events} seq gap${d.gap_events === 1 ? "" : "s"}, last before #${d.last_gap_seq})`);
      key += `m${d.missed}`;
    }
    if (h) {
      const bySource = sourceGaps(h);
      const tg = bySource && S.selected ? (bySource[S.selected] || 0) : h.transport_gaps;
      if (tg > 0) parts.push(`transport gaps${bySource ? ` (${esc(S.selected)})` : ""}: ${tg}`);
      const dropped = Object.entries(h.frames_dropped || {}).filter(([k, v]) => v > 0 && k !== "superseded");
      if (dropped.length) parts.push("frames dropped: " + dropped.map(([k, v]) => `${esc(k)} ${v}`).join(", "));
      key += `t${tg}d${dropped.map(([k, v]) => k + v).join()}`;
    }
    return { parts, key };
  }

  function renderGaps() {
    const { parts, key } = lossParts(sel(), S.health);
    const el = $("gaps");
    if (!parts.length) {
      el.hidden = true;
      return;
    }
    const now = performance.now();
    if (key !== S.gapKey) {
      S.gapKey = key;
      S.gapChangedAt = now;
    }
    const recent = now - S.gapChangedAt < 10000;
    el.classList.toggle("recent", recent);
    el.innerHTML = `⚠ Results lost${recent ? " (growing)" : ""} — ${parts.join(" · ")}`;
    el.hidden = false;
  }

  function renderStatus() {
    const st = S.status;
    const banner = $("banner");
    const pill = $("conn");
    const silentMs = performance.now() - S.lastEvent;
    const endpoint = (S.meta.endpoints || []).join(", ") || "the daemon";
    let text = null;
    if (es.readyState !== EventSource.OPEN || silentMs > GATEWAY_STALE_MS) {
      text = `Dashboard gateway unreachable — no update for ${(silentMs / 1000).toFixed(0)} s (reconnecting…)`;
      pill.className = "pill pill-bad";
      pill.textContent = "gateway lost";
    } else if (st && st.unreachable) {
      const age = isNum(st.age_s) ? `for ${st.age_s.toFixed(1)} s` : "since start-up";
      text = `Daemon unreachable — no message from ${endpoint} ${age}`;
      pill.className = "pill pill-bad";
      pill.textContent = "daemon unreachable";
    } else if (st && st.refusing) {
      // messages come, but none can be read (e.g. a daemon of another major protocol
      // version): nothing shown is current, and the operator must know why
      text = `Results refused — the messages from ${endpoint} cannot be read ` +
        `(${st.rejected} of ${st.messages} refused): ${st.last_rejection || "malformed message"}`;
      pill.className = "pill pill-bad";
      pill.textContent = "results refused";
    } else if (st && st.connected) {
      // some messages refused lately among ones that were read
      const some = isNum(st.refused_age_s) && st.refused_age_s <= (S.meta.stale_s || 3);
      pill.className = some ? "pill pill-wait" : "pill pill-ok";
      pill.textContent = some ? "daemon connected, some messages refused" : "daemon connected";
      pill.title = some ? `${st.rejected} of ${st.messages} messages refused; last: ${st.last_rejection}` : "";
    } else {
      pill.className = "pill pill-wait";
      pill.textContent = "connecting…";
    }
    banner.hidden = text === null;
    document.body.classList.toggle("stale", text !== null);
    if (text !== null) banner.textContent = text;
    renderSourceStale(text === null && st && st.connected);
    renderGaps();
  }

  // The selected source's frames stopped while the daemon goes on (other sources, heartbeats):
  // what is shown is old. Stale after the gateway's stale_s, or 3 of the source's own frame
  // intervals (a slow scan is not stale between its frames).
  function renderSourceStale(daemonLive) {
    const el = $("source-stale");
    const age = daemonLive && S.status.source_age_s && S.selected ? S.status.source_age_s[S.selected] : null;
    const d = sel() && sel().det;
    const limit = Math.max(S.meta.stale_s || 3, d && isNum(d.fps) && d.fps > 0 ? 3 / d.fps : 0);
    const stale = isNum(age) && age > limit;
    el.hidden = !stale;
    $("frame-panel").classList.toggle("stale-source", stale);
    if (stale) {
      el.textContent = `No frames from ${S.selected} for ${fmtDuration(age)} — the daemon is ` +
        "connected; its last frame and numbers are shown";
    }
  }

  // ------------------------------------------------------------------ the frame

  // colour scale: the window's D10 (blue) to D90 (red), so the largest and smallest tenth
  // stand out; this frame's own 10th/90th percentiles until statistics arrive
  function ecdRange(p, det) {
    const win = p.stats && p.stats.window && p.stats.window.ecd;
    if (win && isNum(win.d10) && isNum(win.d90) && win.d90 > win.d10) return [win.d10, win.d90, "window D10 – D90"];
    const v = det.ecd.filter(isNum).sort((a, b) => a - b);
    if (!v.length) return [0, 1, ""];
    const lo = v[Math.floor(0.1 * (v.length - 1))];
    const hi = v[Math.ceil(0.9 * (v.length - 1))];
    return hi > lo ? [lo, hi, "frame 10th – 90th percentile"] : [lo, lo + 1, ""];
  }

  function fitCanvas(cv, cssW, cssH) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(cssW * dpr));
    const h = Math.max(1, Math.round(cssH * dpr));
    if (cv.width !== w) cv.width = w;
    if (cv.height !== h) cv.height = h;
    return dpr;
  }

  function renderFrame() {
    const p = sel();
    const cv = $("frame");
    const shown = p && p.shown;
    $("frame-empty").hidden = !!shown;
    const camBox = $("show-cam");
    camBox.disabled = !(p && p.clsShown);
    if (!shown) {
      // the gateway's reason for no picture (a restarted daemon), else the page's own
      $("frame-empty").textContent = (p && p.frame && p.frame.note) || "waiting for a preview…";
      $("frame-caption").textContent = "";
      $("scalebar").hidden = true;
      renderLegend(null, null);
      return;
    }
    const f = shown.frame;
    const [rows, cols] = f.size;
    const cssW = $("frame-wrap").clientWidth;
    const dpr = fitCanvas(cv, cssW, (cssW * rows) / cols);
    clampView();
    const v = S.view;
    const k = (cv.width / cols) * v.z; // device px per preview px, zoomed
    const ctx = cv.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, cv.width, cv.height);
    ctx.setTransform(k, 0, 0, k, -v.x0 * k, -v.y0 * k);
    ctx.imageSmoothingEnabled = v.z < 4; // zoomed far in: show the pixels as pixels
    ctx.filter = S.contrast !== 100 || S.brightness !== 100
      ? `brightness(${S.brightness}%) contrast(${S.contrast}%)` : "none";
    ctx.drawImage(shown.img, 0, 0, cols, rows);
    ctx.filter = "none";
    if (S.cam && p.clsShown) {
      ctx.globalAlpha = 0.6;
      ctx.drawImage(p.clsShown.img, 0, 0, cols, rows);
      ctx.globalAlpha = 1;
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    cv.dataset.view = `${v.z.toFixed(3)},${v.x0.toFixed(1)},${v.y0.toFixed(1)}`;
    $("zoom-level").textContent = `${v.z.toFixed(1)}×`;
    renderScaleBar(f, cssW, cols);
    const det = f.det;
    const px = f.pixel_size_nm ? `${fmtSig(f.pixel_size_nm)} nm/px` : "uncalibrated";
    $("frame-caption").textContent =
      `${f.source} #${f.seq} · ${f.shape[1]}×${f.shape[0]} px · ${px}` +
      (det ? ` · ${det.n} particles` : " · no detections for this frame yet") +
      (det && det.truncated ? ` (${det.truncated} not drawn)` : "");
    if (!det) {
      renderLegend(null, null);
      return;
    }
    const range = ecdRange(p, det);
    if (S.trails && det.trails) {
      ctx.setTransform(k, 0, 0, k, -v.x0 * k, -v.y0 * k);
      ctx.lineWidth = (1.2 * dpr) / k;
      ctx.strokeStyle = "rgba(255, 220, 80, 0.85)";
      for (let i = 0; i < det.trails.length; i++) {
        const t = det.trails[i];
        if (!t || t.length < 4) continue;
        ctx.beginPath();
        ctx.moveTo(t[0], t[1]);
        for (let j = 2; j < t.length; j += 2) ctx.lineTo(t[j], t[j + 1]);
        ctx.stroke();
      }
      ctx.setTransform(1, 0, 0, 1, 0, 0);
    }
    if (S.outlines) {
      ctx.setTransform(k, 0, 0, k, -v.x0 * k, -v.y0 * k);
      const lw = (1.5 * dpr) / k;
      for (let i = 0; i < det.x.length; i++) {
        const colour = S.colourBy === "class"
          ? classColour(det.shape_class[i])
          : S.colourBy === "cluster"
            ? clusterColour(det.cluster ? det.cluster[i] : null)
            : ramp((det.ecd[i] - range[0]) / (range[1] - range[0]));
        ctx.strokeStyle = colour;
        ctx.lineWidth = i === S.hover ? lw * 2.2 : lw;
        ctx.setLineDash(det.border[i] ? [4 / k * dpr, 3 / k * dpr] : []);
        outline(ctx, det, i);
        ctx.stroke();
      }
      ctx.setLineDash([]);
      if (S.hover >= 0 && S.hover < det.x.length) {
        ctx.strokeStyle = "#ffffff";
        ctx.lineWidth = lw * 0.8;
        outline(ctx, det, S.hover, 2 / k * dpr);
        ctx.stroke();
      }
      ctx.setTransform(1, 0, 0, 1, 0, 0);
    }
    renderLegend(det, range);
  }

  // the largest 1, 2 or 5 x 10^k not above x
  function niceLength(x) {
    const e = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [5, 2, 1]) if (m * e <= x) return m * e;
    return e;
  }

  // a scale bar of about 100 CSS px, in nm (µm from 1000 nm), or frame px when uncalibrated
  function renderScaleBar(f, cssW, cols) {
    const el = $("scalebar");
    const perPreviewPx = f.pixel_size_nm ? f.pixel_size_nm / f.scale : 1 / f.scale;
    const perCssPx = (perPreviewPx * cols) / (cssW * S.view.z);
    if (!isNum(perCssPx) || perCssPx <= 0) {
      el.hidden = true;
      return;
    }
    const len = niceLength(100 * perCssPx);
    const unit = f.pixel_size_nm ? "nm" : "px";
    const label = unit === "nm" && len >= 1000 ? `${fmtSig(len / 1000)} µm` : `${fmtSig(len)} ${unit}`;
    el.querySelector("i").style.width = `${(len / perCssPx).toFixed(1)}px`;
    el.querySelector("span").textContent = label;
    el.dataset.length = String(len);
    el.dataset.unit = unit;
    el.hidden = false;
  }

  function outline(ctx, det, i, grow = 0) {
    ctx.beginPath();
    const a = det.a[i];
    const b = det.b[i];
    if (isNum(a) && isNum(b) && a > 0 && b > 0 && isNum(det.x[i]) && isNum(det.y[i])) {
      const ang = -((det.angle[i] || 0) * Math.PI) / 180; // counter-clockwise as displayed
      ctx.ellipse(det.x[i], det.y[i], Math.max(a, 0.8) + grow, Math.max(b, 0.8) + grow, ang, 0, 2 * Math.PI);
    } else {
      const [x0, y0, x1, y1] = det.bbox.slice(4 * i, 4 * i + 4);
      ctx.rect(x0 - grow, y0 - grow, x1 - x0 + 2 * grow, y1 - y0 + 2 * grow);
    }
  }

  function renderLegend(det, range) {
    const bar = $("colourbar");
    const text = $("legend-text");
    if (!det) {
      bar.hidden = true;
      text.textContent = "";
      return;
    }
    if (S.colourBy === "ecd") {
      bar.hidden = false;
      const ctx = bar.getContext("2d");
      for (let x = 0; x < bar.width; x++) {
        ctx.fillStyle = ramp(x / (bar.width - 1));
        ctx.fillRect(x, 0, 1, bar.height);
      }
      text.textContent = `ECD ≤ ${fmtSig(range[0])} … ≥ ${fmtSig(range[1])} ${det.units}` +
        (range[2] ? ` (${range[2]})` : "") + " · dashed: touches the border · hover a particle for its measurements";
    } else if (S.colourBy === "cluster") {
      bar.hidden = true;
      const counts = {};
      (det.cluster || []).forEach((c) => { counts[c] = (counts[c] || 0) + 1; });
      const keys = Object.keys(counts).map(Number).sort((a, b) => a - b);
      text.innerHTML = keys.length
        ? keys.map((c) => `<span class="sw" style="color:${clusterColour(c)}"><i></i>` +
          `${noCluster(c) ? "not assigned yet" : "cluster " + c} ${counts[c]}</span>`).join("")
        : "no morphology clusters in this frame";
    } else {
      bar.hidden = true;
      const counts = {};
      det.shape_class.forEach((c) => { counts[c] = (counts[c] || 0) + 1; });
      text.innerHTML = Object.keys(counts).map(Number).sort((a, b) => a - b)
        .map((c) => `<span class="sw" style="color:${classColour(c)}"><i></i>${esc(className(c))} ${counts[c]}</span>`)
        .join("");
    }
  }

  function particleAt(det, x, y) {
    let best = -1;
    let bestArea = Infinity;
    let nearest = -1;
    let nearestD = 36; // (6 preview px)², for particles too small to hit
    for (let i = 0; i < det.x.length; i++) {
      const dx = x - det.x[i];
      const dy = y - det.y[i];
      const d2 = dx * dx + dy * dy;
      if (d2 < nearestD) {
        nearestD = d2;
        nearest = i;
      }
      const a = Math.max(det.a[i] || 0, 1.5);
      const b = Math.max(det.b[i] || 0, 1.5);
      const t = ((det.angle[i] || 0) * Math.PI) / 180;
      // rotate into the ellipse frame (angle counter-clockwise as displayed, y down)
      const u = dx * Math.cos(t) - dy * Math.sin(t);
      const v = dx * Math.sin(t) + dy * Math.cos(t);
      if ((u * u) / (a * a) + (v * v) / (b * b) <= 1 && a * b < bestArea) {
        best = i;
        bestArea = a * b;
      }
    }
    return best >= 0 ? best : nearest;
  }

  function showTooltip(e) {
    const p = sel();
    const shown = p && p.shown;
    const det = shown && shown.frame.det;
    const tip = $("tooltip");
    if (!det) {
      tip.hidden = true;
      return;
    }
    const cv = $("frame");
    const r = cv.getBoundingClientRect();
    const [rows, cols] = shown.frame.size;
    const x = S.view.x0 + ((e.clientX - r.left) / r.width) * (cols / S.view.z);
    const y = S.view.y0 + ((e.clientY - r.top) / r.height) * (rows / S.view.z);
    const i = particleAt(det, x, y);
    if (i !== S.hover) {
      S.hover = i;
      mark("frame");
    }
    if (i < 0) {
      tip.hidden = true;
      return;
    }
    const u = det.units;
    const row = (k, v) => `<tr><td>${k}</td><td>${v}</td></tr>`;
    const scale = shown.frame.scale;
    const tid = det.track_id ? det.track_id[i] : 0;
    if (tid) askHistory(shown.frame.source, tid, shown.frame.seq);
    const h = S.history;
    const mine = h && h.track_id === tid && h.source === shown.frame.source;
    tip.innerHTML =
      (tid ? `<div class="tt-title">track ${tid}` +
        (mine && h.seq.length ? ` · seen on ${h.seq.length} recent frames` : "") + "</div>" : "") +
      (mine && h.ecd.length > 1 ? `<canvas id="tt-history" width="220" height="60"></canvas>` : "") +
      `<div class="tt-title">particle ${det.id[i]} · ${esc(className(det.shape_class[i]))}` +
      `${det.border[i] ? " · border" : ""}</div><table>` +
      row("ECD", `${fmtSig(det.ecd[i])} ${u}`) +
      row("area", `${fmtSig(det.area[i])} ${u}²`) +
      row("Feret max / min", `${fmtSig(det.feret_max[i])} / ${fmtSig(det.feret_min[i])} ${u}`) +
      row("ellipse major / minor", `${fmtSig(det.major[i])} / ${fmtSig(det.minor[i])} ${u}`) +
      row("orientation", `${fmt(det.angle[i], 0)}°`) +
      row("aspect ratio", fmt(det.aspect_ratio[i], 2)) +
      row("roundness", fmt(det.roundness[i], 2)) +
      row("circularity", fmt(det.circularity[i], 2)) +
      row("solidity", fmt(det.solidity[i], 2)) +
      row("score", fmt(det.score[i], 2)) +
      row("cluster", det.cluster && !noCluster(det.cluster[i])
        ? `<span style="color:${clusterColour(det.cluster[i])}">●</span> ${det.cluster[i]}` : "not assigned") +
      row("centre", `${fmt(det.x[i] / scale - 0.5, 0)}, ${fmt(det.y[i] / scale - 0.5, 0)} px`) +
      "</table>";
    tip.hidden = false;
    if (mine && h.ecd.length > 1) drawHistory($("tt-history"), h);
    const wrap = $("frame-wrap").getBoundingClientRect();
    let left = e.clientX - wrap.left + 16;
    let top = e.clientY - wrap.top + 16;
    if (left + tip.offsetWidth > wrap.width) left = e.clientX - wrap.left - tip.offsetWidth - 12;
    if (top + tip.offsetHeight > wrap.height) top = e.clientY - wrap.top - tip.offsetHeight - 12;
    tip.style.left = `${Math.max(0, left)}px`;
    tip.style.top = `${Math.max(0, top)}px`;
  }
  // the hovered particle's history: asked of the gateway once per particle and frame
  async function askHistory(source, tid, seq) {
    const key = `${source}/${tid}/${seq}`;
    if (S.historyKey === key) return;
    S.historyKey = key;
    try {
      const r = await fetch(`/api/track?source=${encodeURIComponent(source)}&id=${tid}`);
      const d = await r.json();
      if (S.historyKey !== key) return;
      S.history = d;
      if (S.mouse) showTooltip(S.mouse);
    } catch (err) {
      console.warn("nanoscout: no track history", err);
    }
  }

  // ECD over time of one track (dots off the frame edge, rings on it)
  function drawHistory(cv, h) {
    if (!cv) return;
    const ctx = cv.getContext("2d");
    const W = cv.width, H = cv.height, m = 14;
    const ts = h.t_s, es = h.ecd;
    const t0 = Math.min(...ts), t1 = Math.max(...ts);
    let e0 = Math.min(...es), e1 = Math.max(...es);
    if (e1 - e0 < 1e-9) { e0 -= 0.5; e1 += 0.5; }
    const X = (t) => m + ((t - t0) / Math.max(t1 - t0, 1e-9)) * (W - 2 * m);
    const Y = (e) => H - m - ((e - e0) / (e1 - e0)) * (H - 2 * m);
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = "#9aa4b2";
    ctx.font = "9px sans-serif";
    ctx.fillText(`ECD ${fmtSig(e0)}–${fmtSig(e1)} ${h.units || ""} over ${fmt(t1 - t0, 1)} s`, m, 10);
    ctx.strokeStyle = "#ffdc50";
    ctx.beginPath();
    ts.forEach((t, j) => (j ? ctx.lineTo(X(t), Y(es[j])) : ctx.moveTo(X(t), Y(es[j]))));
    ctx.stroke();
    ts.forEach((t, j) => {
      ctx.beginPath();
      ctx.arc(X(t), Y(es[j]), 2, 0, 2 * Math.PI);
      if (h.border[j]) ctx.stroke(); else ctx.fill();
    });
  }
  $("frame").addEventListener("mousemove", (e) => {
    S.mouse = { clientX: e.clientX, clientY: e.clientY };
    showTooltip(S.mouse);
  });
  $("frame").addEventListener("mouseleave", () => {
    S.mouse = null;
    $("tooltip").hidden = true;
    S.hover = -1;
    mark("frame");
  });

  // ------------------------------------------------------------------ statistics

  function renderStats() {
    const p = sel();
    const st = p && p.stats;
    const body = $("stats-table").tBodies[0];
    if (!st) {
      body.innerHTML = `<tr><td colspan="3" class="empty-inline">no statistics yet</td></tr>`;
      $("stats-units").textContent = "";
      drawHistogram(null);
      drawSeries(null);
      return;
    }
    const u = st.units;
    $("stats-units").textContent = `(${u}, ${st.window.n_frames} frame window)`;
    const q = st.unique; // each tracked particle once (v1.4; null without tracking)
    const ci = (v) => (v ? ` [${fmtSig(v[0])}, ${fmtSig(v[1])}]` : "");
    const three = (f, g) => [f(st.window), f(st.cumulative), q ? g(q) : "–"];
    const rows = [
      ["N (particles)", three((b) => String(b.count), (b) => String(b.count))],
      ["frames", three((b) => String(b.n_frames), (b) => `${b.n_frames} · ${b.fields} field${b.fields === 1 ? "" : "s"}`)],
      [`mean ± sd (${u})`, three((b) => `${fmtSig(b.ecd.mean)} ± ${fmtSig(b.ecd.sd)}`,
        (b) => `${fmtSig(b.ecd.mean)} ± ${fmtSig(b.ecd.sd)}`)],
      [`D10 (${u})`, three((b) => fmtSig(b.ecd.d10), (b) => fmtSig(b.ecd.d10))],
      [`D50 (${u})`, three((b) => fmtSig(b.ecd.d50), (b) => fmtSig(b.ecd.d50) + ci(b.ecd_d50_ci))],
      [`D90 (${u})`, three((b) => fmtSig(b.ecd.d90), (b) => fmtSig(b.ecd.d90))],
      [`min – max (${u})`, three((b) => `${fmtSig(b.ecd.min)} – ${fmtSig(b.ecd.max)}`,
        (b) => `${fmtSig(b.ecd.min)} – ${fmtSig(b.ecd.max)}`)],
      ["density (per µm²)", three((b) => fmtSig(b.number_density_per_um2), (b) => fmtSig(b.number_density_per_um2))],
      ["aspect ratio (mean)", three((b) => fmt(b.aspect_ratio && b.aspect_ratio.mean, 2), () => "")],
      ["roundness (mean)", three((b) => fmt(b.roundness && b.roundness.mean, 2), () => "")],
    ];
    const dr = st.drift || {};
    if (isNum(dr.change_pct)) {
      const sign = dr.change_pct > 0 ? "+" : "";
      rows.push([`D50 drift vs reference`, [`${sign}${dr.change_pct.toFixed(1)} %`, `ref ${fmtSig(dr.reference_d50)}`, ""]]);
    }
    body.innerHTML = rows
      .map(([k, [w, c, o]]) => `<tr><td>${esc(k)}</td><td>${esc(w)}</td><td>${esc(c)}</td><td>${esc(o)}</td></tr>`)
      .join("");
    renderInsitu(st, p);
    drawHistogram(st);
    drawSeries(st);
  }

  // in-situ numbers of the newest stats message and the frame's drift
  function renderInsitu(st, p) {
    const table = $("insitu-table");
    const x = st.insitu;
    table.hidden = !x;
    if (!x) return;
    const u = st.units;
    const ci = (v) => (v ? ` [${fmtSig(v[0])}, ${fmtSig(v[1])}]` : "");
    const det = p && p.shown && p.shown.frame.det;
    const d = det && det.drift;
    const rows = [
      [`D50 of this frame (${u})`, fmtSig(x.d50) + ci(x.d50_ci)],
      ["density (per µm²)", fmtSig(x.density_per_um2) + ci(x.density_ci)],
      [`growth dECD/dt (${u}/s)`, x.growth_tracks ? `${fmtSig(x.growth_rate_d50)}${ci(x.growth_rate_ci)} · ${x.growth_tracks} tracks` : "–"],
      ["coalescences", `${x.coalescences}` + (isNum(x.coalescence_rate_per_s) ? ` · ${fmtSig(x.coalescence_rate_per_s)} per s` : "")],
      [`LSW <r>³ rate (${u}³/s)`, x.lsw && isNum(x.lsw.k) ? `${fmtSig(x.lsw.k)} ± ${fmtSig(x.lsw.k_se)} · R² ${fmt(x.lsw.r2, 3)}` : "–"],
    ];
    if (d) {
      const nm = isNum(d.x_nm) ? ` (${fmtSig(d.x_nm)}, ${fmtSig(d.y_nm)} nm)` : "";
      rows.push(["drift since reference", `${fmt(d.x_px, 1)}, ${fmt(d.y_px, 1)} px${nm}`]);
      rows.push(["field of view", `${d.field}` + (d.new_field && d.reason ? ` · new: ${d.reason}` : "")]);
    }
    table.tBodies[0].innerHTML = rows
      .map(([k, v]) => `<tr><td>${esc(k)}</td><td>${esc(v)}</td></tr>`).join("");
  }

  function chartContext(cv) {
    const cssW = cv.clientWidth || 400;
    const cssH = cv.clientHeight || 160;
    const dpr = fitCanvas(cv, cssW, cssH);
    const ctx = cv.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    ctx.font = "11px system-ui, sans-serif";
    return { ctx, w: cssW, h: cssH };
  }

  function niceTicks(lo, hi, n) {
    const span = hi - lo || 1;
    const step0 = span / n;
    const mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) || 10 * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }

  function logTicks(lo, hi) {
    const out = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
      for (const m of [1, 2, 5]) {
        const v = m * Math.pow(10, e);
        if (v >= lo && v <= hi) out.push(v);
      }
    }
    return out;
  }

  function emptyChart(cv, message) {
    const { ctx, w, h } = chartContext(cv);
    ctx.fillStyle = cssVar("--muted");
    ctx.textAlign = "center";
    ctx.fillText(message, w / 2, h / 2);
  }

  function drawHistogram(st) {
    const cv = $("histogram");
    const hw = st && st.window.histograms && st.window.histograms.ecd;
    const hc = st && st.cumulative.histograms && st.cumulative.histograms.ecd;
    const sum = (a) => a.reduce((s, v) => s + v, 0);
    if (!hw || !hc || (sum(hw.counts) === 0 && sum(hc.counts) === 0)) {
      emptyChart(cv, "no particles yet");
      return;
    }
    const edges = hw.edges;
    const nw = sum(hw.counts) || 1;
    const nc = sum(hc.counts) || 1;
    const fw = hw.counts.map((c) => c / nw);
    const fc = hc.counts.map((c) => c / nc);
    let i0 = edges.length;
    let i1 = -1;
    for (let i = 0; i < fw.length; i++) {
      if (fw[i] > 0 || fc[i] > 0) {
        i0 = Math.min(i0, i);
        i1 = Math.max(i1, i);
      }
    }
    i0 = Math.max(0, i0 - 2);
    i1 = Math.min(fw.length - 1, i1 + 2);
    const { ctx, w, h } = chartContext(cv);
    const m = { l: 40, r: 10, t: 8, b: 30 };
    const lx0 = Math.log10(edges[i0]);
    const lx1 = Math.log10(edges[i1 + 1]);
    const X = (v) => m.l + ((Math.log10(v) - lx0) / (lx1 - lx0)) * (w - m.l - m.r);
    const ymax = Math.max(...fw.slice(i0, i1 + 1), ...fc.slice(i0, i1 + 1)) * 1.12 || 1;
    const Y = (v) => h - m.b - (v / ymax) * (h - m.t - m.b);
    axes(ctx, w, h, m);
    ctx.fillStyle = cssVar("--muted");
    ctx.textAlign = "right";
    for (const t of niceTicks(0, ymax, 4)) {
      if (t > ymax) continue;
      ctx.fillText(`${(t * 100).toFixed(t * 100 < 10 ? 1 : 0)}%`, m.l - 4, Y(t) + 4);
      gridLine(ctx, m.l, Y(t), w - m.r, Y(t));
    }
    ctx.textAlign = "center";
    for (const t of logTicks(edges[i0], edges[i1 + 1])) {
      ctx.fillText(String(Number(t.toPrecision(3))), X(t), h - m.b + 13);
      gridLine(ctx, X(t), m.t, X(t), h - m.b);
    }
    ctx.fillText(`ECD (${st.units}), log scale`, (m.l + w - m.r) / 2, h - 3);
    ctx.fillStyle = cssVar("--win");
    ctx.globalAlpha = 0.75;
    for (let i = i0; i <= i1; i++) {
      if (fw[i] <= 0) continue;
      const x0 = X(edges[i]) + 0.5;
      const x1 = X(edges[i + 1]) - 0.5;
      ctx.fillRect(x0, Y(fw[i]), Math.max(1, x1 - x0), h - m.b - Y(fw[i]));
    }
    ctx.globalAlpha = 1;
    ctx.strokeStyle = cssVar("--cum");
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(X(edges[i0]), Y(0));
    for (let i = i0; i <= i1; i++) {
      ctx.lineTo(X(edges[i]), Y(fc[i]));
      ctx.lineTo(X(edges[i + 1]), Y(fc[i]));
    }
    ctx.lineTo(X(edges[i1 + 1]), Y(0));
    ctx.stroke();
  }

  function axes(ctx, w, h, m) {
    ctx.strokeStyle = cssVar("--line");
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(m.l, m.t);
    ctx.lineTo(m.l, h - m.b);
    ctx.lineTo(w - m.r, h - m.b);
    ctx.stroke();
  }
  function gridLine(ctx, x0, y0, x1, y1) {
    ctx.save();
    ctx.strokeStyle = "rgba(255,255,255,0.06)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(x0, y0);
    ctx.lineTo(x1, y1);
    ctx.stroke();
    ctx.restore();
  }

  function drawSeries(st) {
    const cv = $("series");
    const s = st && st.series;
    if (!s || s.t.length < 2) {
      emptyChart(cv, "collecting…");
      return;
    }
    const { ctx, w, h } = chartContext(cv);
    const m = { l: 40, r: 40, t: 8, b: 30 };
    const t0 = Math.min(...s.t);
    const X = (t) => m.l + ((t - t0) / (0 - t0 || 1)) * (w - m.l - m.r);
    const d50 = s.d50.filter(isNum);
    const cnt = s.count.filter(isNum);
    let dLo = d50.length ? Math.min(...d50) : 0;
    let dHi = d50.length ? Math.max(...d50) : 1;
    // a sensible least span: 20 % of the level (and 1 nm / 2 px), so a D50 that wanders by
    // a few hundredths of a nm is drawn flat instead of as a dramatic oscillation
    const mid = (dLo + dHi) / 2;
    const minSpan = Math.max(0.2 * Math.abs(mid), st.units === "px" ? 2 : 1);
    if (dHi - dLo < minSpan) {
      dLo = mid - minSpan / 2;
      dHi = mid + minSpan / 2;
    }
    const pad = (dHi - dLo) * 0.1;
    const dmin = Math.max(0, dLo - pad);
    const dmax = dHi + pad;
    cv.dataset.d50Axis = `${dmin},${dmax}`;
    const cmax = (cnt.length ? Math.max(...cnt) : 1) * 1.15 || 1;
    const Yd = (v) => h - m.b - ((v - dmin) / (dmax - dmin)) * (h - m.t - m.b);
    const Yc = (v) => h - m.b - (v / cmax) * (h - m.t - m.b);
    axes(ctx, w, h, m);
    ctx.beginPath();
    ctx.moveTo(w - m.r, m.t);
    ctx.lineTo(w - m.r, h - m.b);
    ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillStyle = cssVar("--d50");
    for (const t of niceTicks(dmin, dmax, 4)) {
      if (t < dmin || t > dmax) continue;
      ctx.fillText(fmtSig(t), m.l - 4, Yd(t) + 4);
      gridLine(ctx, m.l, Yd(t), w - m.r, Yd(t));
    }
    ctx.textAlign = "left";
    ctx.fillStyle = cssVar("--count");
    for (const t of niceTicks(0, cmax, 4)) {
      if (t > cmax) continue;
      ctx.fillText(String(t), w - m.r + 4, Yc(t) + 4);
    }
    ctx.textAlign = "center";
    ctx.fillStyle = cssVar("--muted");
    const ticks = niceTicks(t0, 0, 5);
    const digits = ticks.length > 1 && Math.abs(ticks[1] - ticks[0]) < 1 ? 1 : 0;
    for (const t of ticks) {
      const label = t === 0 ? "now" : fmtAgo(-t, digits);
      ctx.fillText(label, X(t), h - m.b + 13);
    }
    ctx.fillText(`time · D50 (${st.units}) left, particles per frame right`, (m.l + w - m.r) / 2, h - 3);
    const line = (ys, Y, colour) => {
      ctx.strokeStyle = colour;
      ctx.lineWidth = 1.8;
      ctx.beginPath();
      let pen = false;
      for (let i = 0; i < s.t.length; i++) {
        if (!isNum(ys[i])) {
          pen = false;
          continue;
        }
        if (pen) ctx.lineTo(X(s.t[i]), Y(ys[i]));
        else ctx.moveTo(X(s.t[i]), Y(ys[i]));
        pen = true;
      }
      ctx.stroke();
    };
    line(s.count, Yc, cssVar("--count"));
    line(s.d50, Yd, cssVar("--d50"));
  }

  // ------------------------------------------------------------------ morphology clusters

  function renderClusters() {
    const p = sel();
    const cl = p && p.stats && p.stats.clusters;
    const table = $("clusters-table");
    const empty = $("clusters-empty");
    const body = table.tBodies[0];
    const items = (cl && cl.items) || [];
    if (!cl || !cl.ready || !items.length) {
      table.hidden = true;
      empty.hidden = false;
      $("clusters-caption").textContent = "";
      empty.textContent = !p || !p.stats ? "no statistics yet"
        : !cl ? "the daemon publishes no morphology clusters"
          : `collecting particles for k = ${cl.k} clusters (${cl.n_seen} seen` +
            (isNum(cl.buffered) ? `, ${cl.buffered} kept` : "") + ")";
      return;
    }
    table.hidden = false;
    empty.hidden = true;
    $("clusters-caption").textContent = `(k = ${cl.k}, online k-means over ${cl.n_seen} particles)`;
    $("clusters-ecd").textContent = `ECD (${cl.units})`;
    body.innerHTML = items.map((c) =>
      `<tr data-cluster="${c.id}"><td><span class="sw" style="color:${clusterColour(c.id)}"></span>${c.id}</td>` +
      `<td>${isNum(c.share) ? (c.share * 100).toFixed(0) + " %" : "–"}</td><td>${isNum(c.count) ? c.count : "–"}</td>` +
      `<td>${fmtSig(c.ecd_mean)}</td><td>${fmt(c.aspect_ratio_mean, 2)}</td><td>${fmt(c.roundness_mean, 2)}</td>` +
      `<td>${esc(c.dominant_shape || "–")}</td></tr>`).join("");
  }

  // ------------------------------------------------------------------ AI lens (asked on demand)

  // the daemon runs its autoencoder only when asked: one request per press (or layer change)
  const LENS_FETCH_MS = 8000; // the gateway gives up after its own timeout (≤ 3 s) first
  let lensBusy = false;

  async function askLens() {
    if (lensBusy) return;
    if (!S.selected) {
      S.lens = { error: "no source yet: wait for the first frame" };
      mark("lens");
      return;
    }
    lensBusy = true;
    S.lensWaiting = true;
    mark("lens");
    const layer = $("lens-layer").value;
    const url = `/api/lens?source=${encodeURIComponent(S.selected)}` + (layer ? `&layer=${encodeURIComponent(layer)}` : "");
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), LENS_FETCH_MS);
    try {
      const r = await fetch(url, { signal: ctl.signal, cache: "no-store" });
      let d = null;
      try {
        d = await r.json();
      } catch (_) {
        d = null;
      }
      if (!r.ok || !d || d.error) throw new Error((d && d.error) || `HTTP ${r.status}`);
      S.lens = d;
    } catch (e) {
      const why = e.name === "AbortError" ? `no answer from the dashboard within ${LENS_FETCH_MS / 1000} s` : e.message;
      S.lens = { error: why, layers: S.lens && S.lens.layers };
    } finally {
      clearTimeout(timer);
      lensBusy = false;
      S.lensWaiting = false;
      mark("lens");
    }
  }
  $("lens-go").addEventListener("click", askLens);
  $("lens-layer").addEventListener("change", askLens);

  function renderLens() {
    const d = S.lens;
    const go = $("lens-go");
    const msg = $("lens-msg");
    const img = $("lens-img");
    const noQuery = S.meta && S.meta.query === null;
    go.disabled = S.lensWaiting || noQuery;
    go.title = noQuery ? "start the dashboard with --query (the daemon's query endpoint)" : "";
    go.textContent = S.lensWaiting ? "asking…" : "AI lens";
    const box = $("lens-layer");
    const layers = (d && d.layers) || [];
    const have = Array.from(box.options).map((o) => o.value).filter((v) => v);
    if (layers.length && have.join() !== layers.join()) {
      box.innerHTML = layers.map((l) => `<option value="${esc(l)}">${esc(l)}</option>`).join("");
    }
    if (d && d.layer) box.value = d.layer;
    msg.classList.toggle("bad", !!(d && d.error));
    if (!d) {
      img.hidden = true;
      $("lens-note").hidden = true;
      msg.hidden = false;
      msg.textContent = noQuery ? "no AI lens: this dashboard was started without --query"
        : "press “AI lens” for the autoencoder’s feature maps of the newest frame";
      $("lens-caption").textContent = "";
      return;
    }
    const note = $("lens-note");
    note.hidden = !!d.error;
    if (d.error) {
      img.hidden = true;
      msg.hidden = false;
      msg.textContent = `AI lens unavailable — ${d.error}`;
      $("lens-caption").textContent = "";
      return;
    }
    msg.hidden = true;
    if (img.dataset.png !== d.png) {
      img.src = "data:image/png;base64," + d.png;
      img.dataset.png = d.png;
    }
    img.hidden = false;
    const maps = d.layer === "reconstruction" ? "reconstruction"
      : `${d.shown} of ${d.channels} maps`;
    $("lens-caption").textContent =
      `${d.source} #${d.seq} · ${d.layer} · ${maps} (${d.map_shape[1]}×${d.map_shape[0]})` +
      ` · novelty ${isNum(d.novelty) ? d.novelty.toFixed(2) : "–"}`;
    note.textContent = d.layer === "reconstruction"
      ? "what the autoencoder rebuilds of the frame (normalised intensity 0 … 1, black … white); novelty 1.0 = the 99th percentile of usual frames"
      : "each map scaled to its own min … max (dark … bright); black: no contrast in this frame; novelty 1.0 = the 99th percentile of usual frames";
  }

  // ------------------------------------------------------------------ classification, health

  function renderClass() {
    const p = sel();
    const c = p && p.cls;
    const body = $("class-body");
    if (!c) {
      body.className = "empty-inline";
      body.textContent = "no classification yet";
      $("class-caption").textContent = "";
      return;
    }
    body.className = "";
    $("class-caption").textContent = `#${c.seq}`;
    const rows = c.labels.map((label, i) => {
      const pr = c.probabilities[i];
      const pct = isNum(pr) ? Math.max(0, Math.min(100, pr * 100)) : 0;
      return `<div class="cls-row"><span title="${esc(label)}">${esc(label)}</span><span class="cls-bar"><i style="width:${pct.toFixed(1)}%"></i></span>` +
        `<span>${isNum(pr) ? pct.toFixed(0) + " %" : "–"}</span></div>`;
    });
    const meta = [
      `novelty ${isNum(c.novelty) ? c.novelty.toFixed(2) : "–"}`,
      `engine ${c.engine ? esc(c.engine) : "–"}`,
      c.heatmap_shape ? `CAM ${c.heatmap_shape[1]}×${c.heatmap_shape[0]}` : "no CAM",
    ];
    body.innerHTML = rows.join("") + `<div class="cls-meta">${meta.join(" · ")}</div>`;
  }

  function renderHealth() {
    const h = S.health;
    const dl = $("health");
    if (!h) return;
    const items = [];
    const add = (k, v, cls = "") => items.push(`<dt>${esc(k)}</dt><dd class="${cls}">${v}</dd>`);
    add("policy", esc(h.policy));
    add("frames/s", fmt(h.fps, 1));
    add("latency p50 / p99", `${fmt(h.latency_ms_p50, 0)} / ${fmt(h.latency_ms_p99, 0)} ms`);
    add("frames", `${h.frames_processed} processed / ${h.frames_received} received`);
    const dropped = Object.entries(h.frames_dropped || {});
    const nDropped = dropped.reduce((s, [, v]) => s + v, 0);
    // superseded frames are the live policy (the newest frame wins), not a fault
    const faults = dropped.filter(([k, v]) => v && k !== "superseded").length;
    add("dropped", nDropped ? dropped.filter(([, v]) => v).map(([k, v]) =>
      `${esc(k)} ${v}${k === "superseded" ? " (live policy: newest frame wins)" : ""}`).join(", ") : "none",
      faults ? "warn" : "");
    const rejected = Object.entries(h.rejected || {});
    const nRejected = rejected.reduce((s, [, v]) => s + v, 0);
    add("rejected", nRejected ? rejected.filter(([, v]) => v).map(([k, v]) => `${esc(k)} ${v}`).join(", ") : "none",
      nRejected ? "warn" : "");
    add("transport gaps", String(h.transport_gaps), h.transport_gaps ? "warn" : "");
    add("queue depth", String(h.queue_depth));
    add("engine", Object.entries(h.engines || {}).map(([k, v]) => `${esc(k)}: ${esc(v)}`).join("<br>") || "–");
    add("uptime", fmtDuration(h.uptime_s));
    if (h.last_error) add("last error", esc(h.last_error), "bad");
    dl.innerHTML = items.join("");
    if (h.model) {
      $("model-line").textContent = `model: ${h.model} · sha256 ${h.model_sha256 || "?"} · generation ` +
        `${h.model_generation ?? 0} · swaps ${h.model_swaps || 0}` +
        (h.model_swap_failures ? ` (${h.model_swap_failures} refused)` : "") +
        ` · frames saved ${h.frames_saved || 0}`;
    }
  }

  // ------------------------------------------------------------------ alerts

  function alertItem(a) {
    const li = document.createElement("li");
    if (a._fresh) li.className = "fresh";
    const when = isNum(a.t_acq_ns) ? new Date(a.t_acq_ns / 1e6).toLocaleTimeString() : "";
    // the gateway names the value's unit (a particle rule's field: nm, nm², ° or none; % of
    // a drift); an older gateway's particle alerts are lengths
    const unit = typeof a.value_unit === "string" ? a.value_unit : a.kind === "particle" ? ` ${a.units}` : "";
    const stage = a.stage ? ` · stage (${fmt(a.stage.x_um, 1)}, ${fmt(a.stage.y_um, 1)}) µm` : "";
    const pic = a.thumb_png
      ? `<img alt="alert ${esc(a.rule)} #${a.seq}" src="data:image/png;base64,${a.thumb_png}">`
      : `<div class="noimg">no picture</div>`;
    li.innerHTML =
      pic +
      `<div><div class="a-head"><span class="sev sev-${esc(a.severity)}">${esc(a.severity)}</span>` +
      `<span class="a-rule">${esc(a.rule)}</span><span class="a-meta">${esc(a.source)} #${a.seq} · ${esc(when)}</span></div>` +
      `<div class="a-expl">${esc(a.explanation)}</div>` +
      `<div class="a-meta">value ${fmtSig(a.value)}${esc(unit)} vs threshold ${fmtSig(a.threshold)}${esc(unit)}${esc(stage)}</div>` +
      (a.thumb_note ? `<div class="a-note">picture: ${esc(a.thumb_note)}</div>` : "") +
      `</div>`;
    li.dataset.alertId = a.id;
    return li;
  }

  function renderAlerts() {
    const list = $("alerts");
    const fresh = S.alerts.filter((a) => a._fresh);
    for (const a of fresh.reverse()) {
      list.insertBefore(alertItem(a), list.firstChild);
      a._fresh = false;
    }
    while (list.children.length > MAX_ALERTS) list.removeChild(list.lastChild);
    $("alerts-empty").hidden = list.children.length > 0;
    $("alert-count").textContent = S.alertTotal > list.children.length
      ? `${S.alertTotal} (newest ${list.children.length} shown)` : String(S.alertTotal);
  }

  // ------------------------------------------------------------------ model, review, annotation
  const A = { id: null, mode: "add", img: null, overlay: null, poly: [], shape: null, polling: null };

  async function desk(path, body) {
    const msg = $("review-msg");
    msg.hidden = false;
    msg.textContent = "asking…";
    try {
      const r = await fetch(path, {
        method: "POST", headers: { "X-Nanoscout": "1", "Content-Type": "application/json" },
        body: body ? JSON.stringify(body) : undefined,
      });
      const d = await r.json();
      if (!r.ok) { msg.textContent = `not done: ${d.error}`; return null; }
      msg.textContent = "";
      return d;
    } catch (err) {
      msg.textContent = `not done: ${err}`;
      return null;
    }
  }
  function say(text) { const m = $("review-msg"); m.hidden = false; m.textContent = text; }

  function drawAnnotation() {
    const cv = $("ann-canvas");
    if (!A.img || !A.shape) return;
    const [rows, cols] = A.shape;
    cv.width = cols; cv.height = rows;
    const ctx = cv.getContext("2d");
    ctx.drawImage(A.img, 0, 0);
    if (A.overlay) ctx.drawImage(A.overlay, 0, 0);
    if (A.poly.length) {
      ctx.strokeStyle = "#4fc3f7"; ctx.lineWidth = Math.max(1, cols / 300);
      ctx.beginPath();
      A.poly.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.stroke();
    }
  }
  function showAnnotation(d) {
    A.id = d.id; A.shape = d.shape;
    if (d.image) loadImage(d.image, (img) => { A.img = img; drawAnnotation(); });
    loadImage(d.overlay, (img) => { A.overlay = img; drawAnnotation(); });
    $("ann-wrap").hidden = false;
    say(`${d.source}#${d.seq}: ${d.n} particles, ${d.edits} edits · saved as ${d.labels_file}`);
  }
  function framePoint(e) {
    const cv = $("ann-canvas");
    const r = cv.getBoundingClientRect();
    return [(e.clientX - r.left) * cv.width / r.width, (e.clientY - r.top) * cv.height / r.height];
  }
  function setMode(mode) {
    A.mode = mode; A.poly = [];
    for (const m of ["add", "remove", "draw"]) $(`ann-${m}`).classList.toggle("on", m === mode);
    drawAnnotation();
  }
  for (const m of ["add", "remove", "draw"]) $(`ann-${m}`).addEventListener("click", () => setMode(m));
  $("ann-freeze").addEventListener("click", async () => {
    if (!S.selected) return;
    const d = await desk(`/api/annotate/freeze?source=${encodeURIComponent(S.selected)}`);
    if (d) showAnnotation(d);
  });
  $("ann-canvas").addEventListener("click", async (e) => {
    if (!A.id) return;
    const [x, y] = framePoint(e);
    if (A.mode === "draw") { A.poly.push([x, y]); drawAnnotation(); return; }
    const d = await desk(`/api/annotate/${A.mode}?id=${encodeURIComponent(A.id)}&x=${x.toFixed(1)}&y=${y.toFixed(1)}`);
    if (d) showAnnotation(d);
  });
  $("ann-canvas").addEventListener("dblclick", async () => {
    if (!A.id || A.mode !== "draw" || A.poly.length < 3) return;
    const points = A.poly; A.poly = [];
    const d = await desk(`/api/annotate/draw?id=${encodeURIComponent(A.id)}`, { points });
    if (d) showAnnotation(d);
  });
  $("save-frame").addEventListener("click", async () => {
    if (!S.selected) return;
    const d = await desk(`/api/frame/save?source=${encodeURIComponent(S.selected)}`);
    if (d) say(`saved: ${d.files.join(", ")}`);
  });
  $("model-revert").addEventListener("click", async () => {
    const d = await desk("/api/model/revert");
    if (d) say(`reverted: ${d.model} (generation ${d.model_generation}) serves now`);
  });
  async function pollAdapt() {
    try {
      const r = await fetch("/api/adapt");
      const d = await r.json();
      const pct = d.progress == null ? "" : ` ${Math.round(d.progress * 100)} %`;
      say(`adaptation ${d.state}${pct} · ${fmt(d.elapsed_s, 0)} s` + (d.log && d.log.length ? ` · ${d.log[d.log.length - 1]}` : ""));
      $("ann-swap").hidden = d.state !== "done";
      if (d.state === "running") A.polling = setTimeout(pollAdapt, 1000);
    } catch (err) {
      say(`adaptation: ${err}`);
    }
  }
  $("ann-adapt").addEventListener("click", async () => {
    const d = await desk("/api/adapt");
    if (d) { clearTimeout(A.polling); pollAdapt(); }
  });
  $("ann-swap").addEventListener("click", async () => {
    const d = await desk("/api/adapt/swap");
    if (d) { say(`swapped: ${d.model} (generation ${d.model_generation}) serves now`); $("ann-swap").hidden = true; }
  });

  mark("all");
})();
