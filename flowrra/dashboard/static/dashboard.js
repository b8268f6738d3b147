"use strict";
(() => {
  // Everything from the server is inserted with textContent / text nodes, never as HTML.
  const $ = (id) => document.getElementById(id);
  const DASH = "\u2013";

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (key === "class") node.className = value;
        else if (key === "title") node.title = value;
        else node.setAttribute(key, value);
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const fmtInt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : DASH);
  const fmtRate = (r) => (typeof r === "number" ? r.toFixed(r >= 100 ? 0 : r >= 10 ? 1 : 2)
    : DASH);

  function fmtDuration(s) {
    if (typeof s !== "number") return DASH;
    if (s < 60) return s.toFixed(0) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function fmtTime(t) {
    if (typeof t !== "number") return DASH;
    const d = new Date(t * 1000);
    const today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString("en-GB") : d.toLocaleString("en-GB");
  }

  function pretty(value) {
    return JSON.stringify(value, null, 2);
  }

  function bar(fraction) {
    const inner = el("div");
    inner.style.width = Math.max(0, Math.min(1, fraction)) * 100 + "%";
    return el("div", { class: "bar" }, inner);
  }

  function emptyRow(columns, text) {
    return el("tr", null, el("td", { class: "empty", colspan: String(columns) }, text));
  }

  // ------------------------------------------------------------------ status

  let lastSnapshot = null;
  let everAvailable = false;

  function setConnection(state, text) {
    const badge = $("conn");
    badge.className = "badge " + state;
    badge.textContent = text;
  }

  function setBanner(text) {
    const banner = $("banner");
    banner.hidden = !text;
    banner.textContent = text || "";
  }

  function render(snapshot) {
    lastSnapshot = snapshot;
    $("broker-url").textContent = snapshot.broker_url;
    drawChart(snapshot);
    if (!snapshot.available) {
      setConnection("down", "broker unavailable");
      setBanner("broker unavailable: " + (snapshot.error || "no answer") + (everAvailable
        ? " (retrying; the numbers below are from its last answer)" : " (retrying)"));
      document.body.classList.add("stale");
      return;
    }
    everAvailable = true;
    setConnection("live", "live");
    setBanner(null);
    document.body.classList.remove("stale");
    const s = snapshot.status;
    const counters = s.counters || {};
    $("broker-id").textContent = String(s.broker_id).slice(0, 12);
    $("broker-id").title = String(s.broker_id);
    $("uptime").textContent = fmtDuration(s.uptime_s);
    $("queued").textContent = fmtInt(s.queued);
    $("in-flight").textContent = fmtInt(s.in_flight);
    $("retry-timers").textContent = fmtInt(s.retry_timers);
    $("dead-letters").textContent = fmtInt(s.dead_letters);
    $("succeeded").textContent = fmtInt(counters.succeeded || 0);
    $("failed").textContent = fmtInt(counters.failed || 0);
    $("submitted").textContent = fmtInt(counters.submitted || 0);
    $("retried").textContent = fmtInt(counters.retried || 0);
    $("cancelled").textContent = fmtInt(counters.cancelled || 0);
    $("expired").textContent = fmtInt(counters.expired || 0);
    $("rate-1m").textContent = fmtRate(s.tasks_per_second_1m);
    const samples = snapshot.throughput.filter((p) => p[1] !== null);
    $("rate-now").textContent = samples.length ? fmtRate(samples[samples.length - 1][1]) : DASH;
    renderQueues(s);
    renderNodes(s.nodes || []);
    renderSchedules(snapshot.schedules || [], s.schedules);
  }

  function renderQueues(s) {
    const byPriority = Object.entries(s.queued_by_priority || {})
      .map(([p, n]) => [Number(p), n]).sort((a, b) => b[0] - a[0]);
    const most = Math.max(1, ...byPriority.map((e) => e[1]));
    $("queue-rows").replaceChildren(...(byPriority.length ? byPriority.map(([p, n]) =>
      el("tr", null, el("td", { class: "mono" }, p), el("td", { class: "num" }, fmtInt(n)),
        el("td", null, bar(n / most)))) : [emptyRow(3, "no queued tasks")]));
    const byName = Object.entries(s.queued_by_name || {}).sort((a, b) => b[1] - a[1]);
    const shown = byName.slice(0, 10).map(([name, n]) =>
      el("tr", null, el("td", { class: "mono" }, name), el("td", { class: "num" }, fmtInt(n))));
    if (byName.length > 10) shown.push(emptyRow(2, (byName.length - 10) + " more names"));
    $("name-rows").replaceChildren(...(shown.length ? shown : [emptyRow(2, "none")]));
  }

  function slots(used, total) {
    if (!total) return el("span", { class: "muted" }, "none");
    return el("span", { class: "slots" }, bar(used / total), fmtInt(used) + " / " + fmtInt(total));
  }

  function renderNodes(nodes) {
    $("node-count").textContent = nodes.length + (nodes.length === 1 ? " node" : " nodes");
    const rows = nodes.map((n) => {
      const age = n.last_heartbeat_age_s;
      const ageClass = "num " + (age > 5 ? "bad" : age > 2 ? "warn" : "");
      const names = n.tasks || [];
      return el("tr", { "data-node-id": n.node_id },
        el("td", { class: "mono node-id" }, n.node_id),
        el("td", null, n.hostname, el("span", { class: "muted" }, " pid " + n.pid)),
        el("td", null, slots(n.async_used, n.async_total)),
        el("td", null, slots(n.cpu_used, n.cpu_total)),
        el("td", { class: "num ok" }, fmtInt(n.tasks_done)),
        el("td", { class: n.tasks_failed ? "num bad" : "num" }, fmtInt(n.tasks_failed)),
        el("td", { class: ageClass }, typeof age === "number" ? age.toFixed(1) + " s" : DASH),
        el("td", { class: "num", title: names.join("\n") }, fmtInt(names.length)));
    });
    $("node-rows").replaceChildren(...(rows.length ? rows : [emptyRow(8, "no nodes connected")]));
  }

  // ------------------------------------------------------------------ schedules

  function fmtSeconds(s) {
    if (s < 60) return (Number.isInteger(s) ? String(s) : s.toFixed(2)) + " s";
    return fmtDuration(s);
  }

  function fmtSchedule(s) {
    if (s.schedule_type === "interval" && typeof s.schedule === "number") {
      return "every " + fmtSeconds(s.schedule);
    }
    if (s.schedule_type === "once" && typeof s.schedule === "number") {
      return "once, " + fmtTime(s.schedule);
    }
    return "cron " + String(s.schedule);
  }

  function taskLink(taskId) {
    const link = el("button", { class: "link mono", type: "button" }, taskId);
    link.addEventListener("click", () => lookup(taskId));
    return link;
  }

  function renderSchedules(list, total) {
    const count = typeof total === "number" ? total : list.length;
    $("schedule-count").textContent = count + (count === 1 ? " schedule" : " schedules");
    const rows = list.map((s) => el("tr", { "data-schedule-id": s.id,
      class: s.enabled ? "enabled" : "disabled" },
      el("td", { class: "mono schedule-id", title: s.description || "" }, s.id),
      el("td", { class: "mono schedule-task" }, s.task_name),
      el("td", { class: "schedule-when" }, fmtSchedule(s),
        el("span", { class: "muted" }, " " + s.tz)),
      el("td", { class: "schedule-enabled " + (s.enabled ? "ok" : "muted") },
        s.enabled ? "yes" : "no"),
      // A disabled schedule has no next run: enabling it picks the next slot.
      el("td", { class: "schedule-next" }, s.enabled ? fmtTime(s.next_run_at) : DASH),
      el("td", { class: "schedule-last" }, fmtTime(s.last_run_at)),
      el("td", null, s.last_task_id ? taskLink(s.last_task_id) : DASH)));
    if (count > list.length) rows.push(emptyRow(7, (count - list.length) + " more"));
    $("schedule-rows").replaceChildren(...(rows.length ? rows : [emptyRow(7, "no schedules")]));
  }

  // ------------------------------------------------------------------ chart

  function drawChart(snapshot) {
    const canvas = $("chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 600;
    const height = 180;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const points = snapshot.throughput || [];
    const span = points.length ? Math.max(60, points.length * snapshot.poll_interval_s) : 300;
    $("chart-span").textContent = String(Math.round(span / 60));
    const end = snapshot.time;
    const start = end - span;
    const left = 48, right = 10, top = 10, bottom = 22;
    const plotW = width - left - right, plotH = height - top - bottom;
    let peak = 0;
    for (const p of points) if (p[1] !== null && p[1] > peak) peak = p[1];
    const yStep = niceStep(peak / 4);
    const yMax = yStep * 4;
    const decimals = yStep >= 1 ? 0 : yStep === 0.25 ? 2 : 1;
    const x = (t) => left + ((t - start) / span) * plotW;
    const y = (v) => top + plotH - (v / yMax) * plotH;
    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#e2e6ee";
    ctx.fillStyle = "#6b7385";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(width - right, yy); ctx.stroke();
      ctx.fillText(v.toFixed(decimals), left - 6, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const step = span > 240 ? 60 : 30;
    for (let ago = 0; ago <= span; ago += step) {
      ctx.fillText(ago === 0 ? "now" : "-" + fmtAgo(ago), x(end - ago), top + plotH + 6);
    }
    // The series, with a gap wherever the broker did not answer.
    const segments = [];
    let current = [];
    for (const [t, v] of points) {
      if (v === null) { if (current.length) segments.push(current); current = []; }
      else current.push([x(t), y(v)]);
    }
    if (current.length) segments.push(current);
    for (const seg of segments) {
      ctx.beginPath();
      ctx.moveTo(seg[0][0], y(0));
      for (const [px, py] of seg) ctx.lineTo(px, py);
      ctx.lineTo(seg[seg.length - 1][0], y(0));
      ctx.closePath();
      ctx.fillStyle = "rgba(47, 111, 223, 0.15)";
      ctx.fill();
      ctx.beginPath();
      seg.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
      ctx.strokeStyle = "#2f6fdf";
      ctx.lineWidth = 2;
      ctx.stroke();
    }
  }

  function fmtAgo(s) {
    return s % 60 === 0 ? s / 60 + " min" : s + " s";
  }

  function niceStep(v) {
    // The smallest of 1, 2 or 5 times a power of ten that is at least v (0.25 at the least).
    if (v <= 0.25) return 0.25;
    const magnitude = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5]) if (v <= m * magnitude) return m * magnitude;
    return 10 * magnitude;
  }

  window.addEventListener("resize", () => { if (lastSnapshot) drawChart(lastSnapshot); });

  // ------------------------------------------------------------------ failures

  function renderFailures(records) {
    const rows = records.map((r) => {
      const error = el("td", { class: "error" }, r.error || "");
      if (r.traceback) {
        error.append(el("details", null, el("summary", null, "traceback"),
          el("pre", null, r.traceback)));
      }
      return el("tr", { "data-task-id": r.task_id },
        el("td", null, fmtTime(r.finished_at)), el("td", null, taskLink(r.task_id)),
        el("td", { class: "mono" }, r.task_name), error,
        el("td", { class: "num" }, fmtInt(r.retries)));
    });
    $("failure-rows").replaceChildren(...(rows.length ? rows : [emptyRow(5, "no failures")]));
  }

  // ------------------------------------------------------------------ lookup

  function field(list, name, value) {
    list.append(el("dt", null, name), el("dd", null, value));
  }

  function taskLinks(ids, none, id) {
    const out = el("span", { id: id });
    if (!ids || !ids.length) {
      out.append(el("span", { class: "muted" }, none));
      return out;
    }
    ids.slice(0, 50).forEach((taskId, i) => {
      if (i) out.append(", ");
      out.append(taskLink(taskId));
    });
    if (ids.length > 50) out.append(" and " + (ids.length - 50) + " more");
    return out;
  }

  async function lookup(taskId) {
    const out = $("lookup-out");
    $("lookup-id").value = taskId;
    out.replaceChildren(el("p", { class: "muted" }, "looking up…"));
    let response, data;
    try {
      response = await fetch("api/task/" + encodeURIComponent(taskId), { cache: "no-store" });
      data = await response.json();
    } catch (e) {
      out.replaceChildren(el("p", { class: "bad" }, "the dashboard did not answer"));
      return;
    }
    if (!response.ok) {
      const text = response.status === 503 ? "broker unavailable: " : "";
      out.replaceChildren(el("p", { class: "bad", id: "lookup-error" },
        text + (data.error || response.statusText)));
      return;
    }
    const info = el("dl");
    field(info, "Task id", el("span", { class: "mono" }, data.task_id));
    field(info, "Name", el("span", { class: "mono" }, data.task_name));
    field(info, "Status", el("span", { class: "status-" + data.status, id: "lookup-status" },
      data.status));
    field(info, "Priority", String(data.priority));
    field(info, "Attempts", data.attempt + " (retries " + data.retries + " of " +
      data.max_retries + ")");
    if (data.node_id) field(info, "Running on", el("span", { class: "mono" }, data.node_id));
    field(info, "Submitted", fmtTime(data.submitted_at));
    if (data.started_at) field(info, "Started", fmtTime(data.started_at));
    if (data.finished_at) field(info, "Finished", fmtTime(data.finished_at));
    if (data.retry_at) field(info, "Next retry", fmtTime(data.retry_at));
    if (data.eta) field(info, "Due", el("span", { id: "lookup-eta" }, fmtTime(data.eta)));
    const wf = data.workflow;
    if (wf) {
      field(info, "Workflow", el("span", { id: "lookup-workflow" },
        el("span", { class: "mono" }, wf.workflow),
        " (" + wf.kind + (typeof wf.step === "number" ? ", step " + (wf.step + 1) : "") + ")"));
      field(info, "Parents", taskLinks(wf.parents, "none (first step)", "lookup-parents"));
      field(info, "Children", taskLinks(wf.children, "none (last step)", "lookup-children"));
    }
    const parts = [info];
    if (data.args_note) parts.push(el("p", { class: "muted" }, data.args_note));
    else {
      parts.push(el("h3", null, "Arguments"), el("pre", { id: "lookup-args" }, pretty(data.args)));
      if (data.kwargs && Object.keys(data.kwargs).length) {
        parts.push(el("h3", null, "Keyword arguments"), el("pre", null, pretty(data.kwargs)));
      }
    }
    if (data.has_result) {
      parts.push(el("h3", null, "Result"), data.result_note
        ? el("p", { class: "muted" }, data.result_note)
        : el("pre", { id: "lookup-result" }, pretty(data.result)));
    }
    if (data.error) {
      parts.push(el("h3", null, "Error"), el("pre", { class: "bad", id: "lookup-error" },
        data.error));
      if (data.traceback) parts.push(el("details", null, el("summary", null, "traceback"),
        el("pre", null, data.traceback)));
    }
    if (data.history && data.history.length) {
      const rows = data.history.map((h) => el("tr", { "data-attempt": String(h.attempt) },
        el("td", { class: "num" }, h.attempt), el("td", { class: "mono" }, h.node_id || DASH),
        el("td", null, fmtTime(h.started_at)), el("td", null, fmtTime(h.finished_at)),
        el("td", { class: "num" }, fmtRun(h.run_s)),
        el("td", { class: "outcome status-" + h.outcome }, h.outcome),
        el("td", { class: "bad" }, h.error || "")));
      parts.push(el("h3", null, "Attempts"), el("table", { id: "lookup-history" },
        el("thead", null, el("tr", null, ...["#", "Node", "Started", "Finished", "Took",
          "Outcome", "Error"].map((h) => el("th", null, h)))),
        el("tbody", null, ...rows)));
    }
    out.replaceChildren(...parts);
  }

  // ------------------------------------------------------------------ task browser

  function fmtRun(s) {
    if (typeof s !== "number") return DASH;
    if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms";
    return fmtSeconds(s);
  }

  function fmtPercent(r) {
    return typeof r === "number" ? (r * 100).toFixed(1) + " %" : DASH;
  }

  async function getJSON(path) {
    const response = await fetch(path, { cache: "no-store" });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    return data;
  }

  let browserKey = null;  // what the task list and figures were last fetched for

  async function refreshBrowser(force) {
    const status = $("filter-status").value;
    const name = $("filter-name").value;
    const s = lastSnapshot && lastSnapshot.status;
    const c = (s && s.counters) || {};
    // Activity that changes the lists: fetched again only when it moved (or the filter).
    const key = JSON.stringify([status, name, s && s.broker_id, c.submitted, c.succeeded,
      c.failed, c.retried, c.cancelled, c.expired, c.dead_retried, s && s.in_flight]);
    if (!force && key === browserKey) return;
    browserKey = key;
    const query = new URLSearchParams();
    if (status) query.append("status", status);
    if (name) query.append("name", name);
    try {
      const [tasks, stats] = await Promise.all([getJSON("api/tasks?" + query.toString()),
        getJSON("api/stats")]);
      renderTasks(tasks);
      renderStats(stats);
    } catch (e) {
      browserKey = null;  // try again with the next status
      $("task-count").textContent = "could not load: " + e.message;
    }
  }

  function renderTasks(tasks) {
    $("task-count").textContent = tasks.length + (tasks.length === 1 ? " task" : " tasks");
    const rows = tasks.map((t) => el("tr", { "data-task-id": t.task_id },
      el("td", null, taskLink(t.task_id)), el("td", { class: "mono" }, t.task_name),
      el("td", { class: "task-status status-" + t.status }, t.status),
      el("td", { class: "num" }, fmtInt(t.attempt)),
      el("td", null, fmtTime(t.submitted_at)), el("td", null, fmtTime(t.finished_at)),
      el("td", { class: "error" }, t.error || "")));
    $("task-rows").replaceChildren(...(rows.length ? rows : [emptyRow(7, "no such tasks")]));
  }

  function renderStats(reply) {
    const entries = Object.entries(reply.tasks || {});
    $("stats-note").textContent = "since " + fmtTime(reply.since) + "; run times of the last " +
      reply.run_window + " finished";
    const rows = entries.map(([name, f]) => el("tr", { "data-task-name": name },
      el("td", { class: "mono" }, name), el("td", { class: "num" }, fmtInt(f.submitted)),
      el("td", { class: "num" }, fmtInt(f.finished)),
      el("td", { class: f.failed ? "num bad" : "num" }, fmtInt(f.failed)),
      el("td", { class: "num failure-rate" }, fmtPercent(f.failure_rate)),
      el("td", { class: "num" }, fmtInt(f.retried)),
      el("td", { class: "num p50" }, fmtRun(f.p50_s)),
      el("td", { class: "num p95" }, fmtRun(f.p95_s))));
    $("stat-rows").replaceChildren(...(rows.length ? rows : [emptyRow(8, "no tasks yet")]));
    // The name filter offers every name seen (keeping the one chosen).
    const select = $("filter-name");
    const chosen = select.value;
    const names = entries.map((e) => e[0]);
    if (chosen && !names.includes(chosen)) names.push(chosen);
    const current = Array.from(select.options).slice(1).map((o) => o.value);
    if (JSON.stringify(current) !== JSON.stringify(names)) {
      select.replaceChildren(el("option", { value: "" }, "any"),
        ...names.map((n) => el("option", { value: n }, n)));
      select.value = chosen;
    }
  }

  // ------------------------------------------------------------------ start

  let deadKey = null;  // the dead_signature the failures were last fetched for

  async function refreshFailures(snapshot) {
    const key = JSON.stringify(snapshot.dead_signature);
    if (!snapshot.available || key === deadKey) return;
    try {
      renderFailures(await getJSON("api/dead"));
      deadKey = key;
    } catch (e) {
      deadKey = null;
    }
  }

  async function poll() {
    let interval = 2;
    try {
      let snapshot = null;
      try {
        const response = await fetch("api/status", { cache: "no-store" });
        snapshot = await response.json();
      } catch (e) {
        setConnection("wait", "dashboard unreachable");
      }
      if (snapshot) {
        interval = snapshot.poll_interval_s;
        render(snapshot);
        if (snapshot.available) await Promise.all([refreshFailures(snapshot), refreshBrowser()]);
      }
    } finally {
      setTimeout(poll, Math.max(0.2, interval) * 1000);  // whatever happened, poll again
    }
  }

  function start() {
    $("lookup-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const id = $("lookup-id").value.trim();
      if (id) lookup(id);
    });
    $("task-filter").addEventListener("submit", (event) => event.preventDefault());
    for (const id of ["filter-status", "filter-name"]) {
      $(id).addEventListener("change", () => refreshBrowser(true));
    }
    poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
