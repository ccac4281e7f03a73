"use strict";
// Trace browser. All trace text is inserted with textContent, never as markup.
window.onerror = function (msg, src, line, col, err) {
  var box = document.getElementById("errors");
  if (box) {
    box.textContent += (err && err.stack ? err.stack : String(msg)) + " (" + line + ":" + col + ")\n";
  }
};
(function () {
  var MAX_ROWS = 2000;
  var data = JSON.parse(document.getElementById("data").textContent);
  var traces = data.traces;
  var $ = function (id) { return document.getElementById(id); };
  var side = $("f-side"), reason = $("f-reason"), query = $("f-q");
  var rows = $("rows"), detail = $("detail");
  var selected = null;

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  data.reason_codes.forEach(function (code) {
    var o = el("option", code);
    o.value = code;
    reason.appendChild(o);
  });

  function haystack(t) {
    if (t._hay === undefined) {
      var parts = [t.id, t.problem_id, t.completion || "", t.reasoning || ""];
      t.messages.forEach(function (m) { parts.push(m.content); });
      t.reasons.forEach(function (r) { parts.push(r.code, r.detail); });
      t._hay = parts.join("\n").toLowerCase();
    }
    return t._hay;
  }

  function matches(t, s, r, q) {
    if (s && t.side !== s) return false;
    if (r === "-" && t.reasons.length) return false;
    if (r && r !== "-" && !t.reasons.some(function (x) { return x.code === r; })) return false;
    if (q && haystack(t).indexOf(q) < 0) return false;
    return true;
  }

  function saveHash() {
    var p = new URLSearchParams();
    if (side.value) p.set("side", side.value);
    if (reason.value) p.set("reason", reason.value);
    if (query.value) p.set("q", query.value);
    if (selected) p.set("trace", selected.id);
    try { history.replaceState(null, "", "#" + p.toString()); } catch (e) { /* file:// may refuse */ }
  }

  function render() {
    var s = side.value, r = reason.value, q = query.value.trim().toLowerCase();
    var list = traces.filter(function (t) { return matches(t, s, r, q); });
    rows.textContent = "";
    list.slice(0, MAX_ROWS).forEach(function (t) {
      var tr = el("tr", null, "trace-row");
      tr.dataset.traceId = t.id;
      tr.tabIndex = 0;
      tr.setAttribute("aria-selected", selected === t ? "true" : "false");
      var idc = el("td", t.id, "id");
      idc.title = t.id;
      tr.appendChild(idc);
      tr.appendChild(el("td", t.problem_id + (t.sample_index === null ? "" : " #" + t.sample_index)));
      tr.appendChild(el("td", t.side, "side-" + t.side));
      var rc = el("td");
      t.reasons.forEach(function (x) { rc.appendChild(el("span", x.code, "code")); });
      tr.appendChild(rc);
      tr.appendChild(el("td", t.completion_tokens === null ? "-" : t.completion_tokens));
      tr.addEventListener("click", function () { show(t); });
      tr.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); show(t); }
      });
      rows.appendChild(tr);
    });
    $("shown-count").textContent = String(Math.min(list.length, MAX_ROWS));
    $("shown-total").textContent = String(list.length) +
      (list.length > MAX_ROWS ? " (first " + MAX_ROWS + " listed; narrow the filter)" : "");
    saveHash();
  }

  // Text with highlighted ranges; ranges are UTF-16 indices computed by the report writer.
  function highlighted(text, marks) {
    var pre = el("pre");
    marks = marks.filter(function (m) { return m.start < m.end; })
      .sort(function (a, b) { return a.start - b.start; });
    var at = 0;
    marks.forEach(function (m) {
      var start = Math.max(m.start, at), end = Math.min(m.end, text.length);
      if (start >= end) return;
      pre.appendChild(document.createTextNode(text.slice(at, start)));
      var mk = el("mark", text.slice(start, end), m.cls);
      mk.title = m.title;
      pre.appendChild(mk);
      at = end;
    });
    pre.appendChild(document.createTextNode(text.slice(at)));
    return pre;
  }

  function marksFor(t, field) {
    var out = [];
    t.reasons.forEach(function (r) {
      if (r.field === field && r.span_utf16) {
        out.push({ start: r.span_utf16.start, end: r.span_utf16.end, cls: "rule", title: r.code });
      }
    });
    if (field === "completion" && t.answer_span_utf16) {
      out.push({ start: t.answer_span_utf16.start, end: t.answer_span_utf16.end, cls: "answer", title: "graded answer" });
    }
    return out;
  }

  function show(t) {
    selected = t;
    Array.prototype.forEach.call(rows.children, function (tr) {
      tr.setAttribute("aria-selected", tr.dataset.traceId === t.id ? "true" : "false");
    });
    detail.textContent = "";
    detail.appendChild(el("h3", t.id));
    var meta = "problem " + t.problem_id +
      (t.sample_index === null ? "" : ", sample " + t.sample_index) +
      ", " + t.side +
      (t.finish_reason ? ", finish " + t.finish_reason : "") +
      (t.completion_tokens === null ? "" : ", " + t.completion_tokens + " tokens");
    detail.appendChild(el("p", meta, "muted"));
    if (t.cut_fields.length) {
      detail.appendChild(el("p", "Cut for the report: " + t.cut_fields.join(", "), "muted"));
    }
    detail.appendChild(el("h4", "Reasons"));
    if (!t.reasons.length) detail.appendChild(el("p", "none", "muted"));
    t.reasons.forEach(function (r) {
      var box = el("div", null, "reason");
      var head = el("p");
      head.appendChild(el("span", r.code, "code"));
      head.appendChild(document.createTextNode(" " + r.stage + (r.detail ? ": " + r.detail : "")));
      box.appendChild(head);
      if (r.span) {
        var where = "bytes " + r.span[0] + ".." + r.span[1] + " of " + (r.field || "?") +
          (r.span_utf16 ? " (highlighted)" : " (not highlighted)");
        box.appendChild(el("p", where, "muted"));
      }
      if (r.evidence !== null && r.evidence !== undefined) {
        box.appendChild(el("pre", JSON.stringify(r.evidence, null, 2)));
      }
      detail.appendChild(box);
    });
    if (t.check !== null && t.check !== undefined) {
      detail.appendChild(el("h4", "Check"));
      detail.appendChild(el("pre", JSON.stringify(t.check, null, 2)));
    }
    detail.appendChild(el("h4", "Prompt"));
    t.messages.forEach(function (m) {
      detail.appendChild(el("p", m.role, "muted"));
      detail.appendChild(el("pre", m.content));
    });
    if (t.reasoning !== null) {
      detail.appendChild(el("h4", "Reasoning"));
      detail.appendChild(highlighted(t.reasoning, marksFor(t, "reasoning")));
    }
    detail.appendChild(el("h4", "Completion"));
    if (t.completion === null) detail.appendChild(el("p", "none", "muted"));
    else detail.appendChild(highlighted(t.completion, marksFor(t, "completion")));
    saveHash();
  }

  var p = new URLSearchParams(location.hash.replace(/^#/, ""));
  if (p.has("side")) side.value = p.get("side");
  if (p.has("reason")) {
    reason.value = p.get("reason");
    if (reason.value !== p.get("reason")) reason.value = "";
  }
  if (p.has("q")) query.value = p.get("q");
  [side, reason].forEach(function (c) { c.addEventListener("change", render); });
  query.addEventListener("input", render);
  render();
  if (p.has("trace")) {
    var want = p.get("trace");
    var t = traces.find(function (x) { return x.id === want; });
    if (t) show(t);
  }
  $("shown-total").dataset.all = String(traces.length);
  document.body.dataset.ready = "1";
})();
